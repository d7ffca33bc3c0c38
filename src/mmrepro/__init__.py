"""mmrepro: a library and Snakemake workflow for robust and efficient multimodal learning."""

import os

__version__ = "0.1.0"

# MLflow's usage telemetry off unless the user says otherwise (MLFLOW_DISABLE_TELEMETRY=false): on a
# machine that cannot reach MLflow's servers (a compute node), MLflow 3.17's telemetry thread, once its
# config request fails, deletes a variable of os.environ while the job's first call to a tracking
# server reads os.environ, which fails that call with `KeyError: '_MLFLOW_TELEMETRY_SESSION_ID'`
# (1 of 54 live-logged jobs of the tiny rehearsal's sample through SLURM). Set before any mlflow import.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
