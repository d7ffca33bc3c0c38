# Shared helpers: config validation at parse time, output paths and run specs.
# All logic lives in mmrepro.config; these functions only adapt it to wildcards.
import json
import shlex
from pathlib import Path

from mmrepro.config import (
    STUDY_KINDS,
    backbone_spec,
    dataset_path,
    dataset_spec,
    load_schema,
    run_spec,
    study_grid,
    teacher_runs,
    validate_config,
)

validate_config(config, load_schema(Path(workflow.basedir) / "schemas" / "config.schema.yaml"))

RESULTS = config["results"]
# Every job runs in the project's environment (used with --sdm conda; also answers --lint).
CONDA_ENV = str(Path(workflow.basedir).parent / "environment.yml")
TRAIN_RES = config["resources"]["train"]
# Loaders whose raw data is a folder, and what converting each costs (images and volumes: more).
FOLDER_LOADERS = ("food101", "brats", "iemocap_h5")
DATA_MEM_MB = {"mmsa": 16000, "mult": 16000, "food101": 16000, "brats": 8000}
DATA_RUNTIME = {"food101": 600, "brats": 240}


wildcard_constraints:
    seed=r"\d+",
    dataset=r"[A-Za-z0-9_-]+",
    method=r"[A-Za-z0-9_+]+",
    setting=r"[A-Za-z0-9_.-]+",


def store(dataset):
    return f"{RESULTS}/data/{dataset}/manifest.json"


def raw_sources():
    """Raw path -> the first dataset that reads it (one fetch rule per path)."""
    sources = {}
    for name in config["datasets"]:
        path = dataset_path(config, name)
        if path is not None:
            sources.setdefault(path, name)
    return sources


def run_dir(study, dataset, method, setting, seed):
    return f"{RESULTS}/{study}/{dataset}/{method}/{setting}/seed{seed}"


def backbone_model(study, dataset, seed):
    return f"{RESULTS}/backbones/{study}/{dataset}/seed{seed}/model.pt"


def teachers(wildcards):
    """Modality -> model.pt of the unimodal runs a distilling method (UMT) learns from."""
    w = wildcards
    runs = teacher_runs(config, w.study, w.dataset, w.method, int(w.seed))
    return {m: f"{run_dir(**run)}/model.pt" for m, run in runs.items()}


def spec_json(wildcards):
    """The job's run spec, as JSON for the command line (changes to it re-run the job)."""
    w = wildcards
    return json.dumps(run_spec(config, w.study, w.dataset, w.method, w.setting, int(w.seed)))


def study_metrics(study):
    return [f"{run_dir(**run)}/metrics.json" for run in study_grid(config, study)]


def paper_reference(study):
    """The paper's reported numbers for a study (config/reference/<study>.csv), when recorded."""
    path = Path(workflow.basedir).parent / "config" / "reference" / f"{study}.csv"
    return [str(path)] if path.is_file() else []


def study_report(study):
    """A study's table and plot, plus per-epoch curves for the studies that train, plus the CGGM
    paper's Tables 5, 6 and Figure 5 for the balance study."""
    curves = ["_curves"] if STUDY_KINDS[study] != "adapt" else []
    cggm = [f"{RESULTS}/tables/balance_cggm.md"] + [f"{RESULTS}/plots/balance_cggm.{ext}" for ext in ("png", "pdf")]
    return [f"{RESULTS}/tables/{study}.{ext}" for ext in ("md", "csv", "tex")] + [
        f"{RESULTS}/plots/{study}{suffix}.{ext}" for suffix in ["", *curves] for ext in ("png", "pdf")
    ] + (cggm if study == "balance" else [])
