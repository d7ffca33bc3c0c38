"""Tables and plots for a study, built from the ``metrics.json`` files of its runs.

The report is built from ``metrics.json`` files only, never from MLflow, so it
can be regenerated offline (and reproducibly) from a results folder alone.

    runs = load_runs(paths)                      # long frame, one row per run x split x metric
    summary = summarize(runs, split="test")      # mean/std over seeds, n, oracle
    ref = load_reference("config/reference/balance.csv", "config/reference/names.yaml", "balance")
    write_table(summary, Path("results/study"), reference=ref)  # study.md/.csv/.tex, paper beside ours
    plot_study(runs, Path("results/study"))      # study.png, study.pdf
    plot_curves(load_histories(paths), Path("results/study_curves"))  # per-epoch curves
"""

from .curves import load_histories, plot_curves
from .plots import plot_study
from .reference import Reference, load_reference
from .tables import add_baseline_delta, add_reference, load_runs, summarize, write_table

__all__ = ["load_runs", "summarize", "write_table", "plot_study", "add_reference", "add_baseline_delta", "Reference",
           "load_reference",
           "load_histories", "plot_curves"]
