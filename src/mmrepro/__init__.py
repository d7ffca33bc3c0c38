"""mmrepro: a library and Snakemake workflow for robust and efficient multimodal learning."""

__version__ = "0.1.0"
