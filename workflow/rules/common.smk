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


def spec_json(wildcards):
    """The job's run spec, as JSON for the command line (changes to it re-run the job)."""
    w = wildcards
    return json.dumps(run_spec(config, w.study, w.dataset, w.method, w.setting, int(w.seed)))


def study_metrics(study):
    return [f"{run_dir(**run)}/metrics.json" for run in study_grid(config, study)]


def paper_reference(study):
    """The paper's reported numbers for a study and the names mapping, when recorded:
    [config/reference/<study>.csv, config/reference/names.yaml] or []."""
    folder = Path(workflow.basedir).parent / "config" / "reference"
    path = folder / f"{study}.csv"
    return [str(path), str(folder / "names.yaml")] if path.is_file() else []


def study_report(study):
    """A study's table and plot, plus per-epoch curves for the studies that train."""
    curves = ["_curves"] if STUDY_KINDS[study] != "adapt" else []
    return [f"{RESULTS}/tables/{study}.{ext}" for ext in ("md", "csv", "tex", "html")] + [
        f"{RESULTS}/plots/{study}{suffix}.{ext}" for suffix in ["", *curves] for ext in ("png", "pdf")
    ]
