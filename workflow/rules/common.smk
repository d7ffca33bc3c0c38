# Shared helpers: config validation at parse time, output paths and run specs.
# All logic lives in mmrepro.config; these functions only adapt it to wildcards.
import json
import shlex
from functools import cache
from pathlib import Path

from mmrepro.config import (
    STUDY_KINDS,
    backbone_runs,
    backbone_source,
    backbone_spec,
    dataset_path,
    dataset_spec,
    fetch_rules,
    load_schema,
    mechanism_points,
    mechanism_spec,
    paired_planned,
    paired_reference,
    run_folder,
    run_spec,
    search_run,
    search_spec,
    spec_file,
    study_grid,
    target_dataset,
    teacher_runs,
    tuned_methods,
    validate_config,
)
from mmrepro.report.cggm import planned_figure5
from mmrepro.report.missing import planned_curves
from mmrepro.resources import data_resources, search_resources, train_resources
from mmrepro.tracking import tracking_mode, tracking_uri

validate_config(config, load_schema(Path(workflow.basedir) / "schemas" / "config.schema.yaml"))

RESULTS = config["results"]
TUNE = f"{RESULTS}/tune"
# Every job runs in the project's environment (used with --sdm conda; also answers --lint).
CONDA_ENV = str(Path(workflow.basedir).parent / "environment.yml")
TRAIN_RES = config["resources"]["train"]
# Loaders whose raw data is a folder. What each job asks for: mmrepro.resources (per dataset entry).
FOLDER_LOADERS = ("food101", "brats", "iemocap_h5")
# Jobs that log live need the store and its experiments made first; deferred jobs never open the
# store, so they do not wait for it (tracking.mode; MLFLOW_TRACKING_URI as the jobs will see it).
JOB_TRACKING = (
    [f"{RESULTS}/tracking/experiments.json"]
    if tracking_mode(tracking_uri(RESULTS, config["tracking"]["uri"]), config["tracking"]["mode"]) == "live"
    else []
)


wildcard_constraints:
    seed=r"\d+",
    dataset=r"[A-Za-z0-9_-]+",
    method=r"[A-Za-z0-9_+]+",
    setting=r"[A-Za-z0-9_.-]+",
    backbone=r"[A-Za-z0-9_.+-]+",


def store(dataset):
    return f"{RESULTS}/data/{dataset}/manifest.json"


def run_dir(study, dataset, method, setting, seed, backbone=None):
    """A run's folder; a run on the shift study's backbone axis has its backbone's name after the dataset."""
    return run_folder(RESULTS, dict(study=study, dataset=dataset, method=method, setting=setting, seed=seed,
                                    backbone=backbone))


def backbone_dir(study, dataset, seed, backbone=None):
    return Path(RESULTS, "backbones", study, dataset, *([backbone] if backbone else []), f"seed{seed}").as_posix()


def backbone_model(study, dataset, seed, backbone=None):
    return f"{backbone_dir(study, dataset, seed, backbone)}/model.pt"


def tune_inputs(wildcards):
    """A search's study file, the data its trials read (a cross-dataset setting's target) and the model
    they start from (fine-tuning) or adapt (the search's backbone, or the source_model run)."""
    w = wildcards
    run, kind = search_run(config, w.study, w.dataset, w.method), STUDY_KINDS[w.study]
    init = []
    if kind == "finetune":
        init = backbone_model(w.study, w.dataset, run["seed"])
    elif kind == "adapt":
        init = shift_source(w.dataset, run["backbone"], run["seed"])["model"]
    return {
        "search": f"{TUNE}/{w.study}/{w.dataset}/{w.method}/search.json",
        "data": store(target_dataset(config, w.study, w.dataset, run["setting"])),
        "init": init,
    }


def tuned_best(study):
    """Input function: a run's search result (best.json) when its method is tuned, else nothing."""

    def best(wildcards):
        if wildcards.method not in tuned_methods(config, study or wildcards.study):
            return []
        return f"{TUNE}/{study or wildcards.study}/{wildcards.dataset}/{wildcards.method}/best.json"

    return best


def teachers(wildcards):
    """Modality -> model.pt of the unimodal runs a distilling method (UMT) learns from."""
    w = wildcards
    runs = teacher_runs(config, w.study, w.dataset, w.method, int(w.seed))
    return {m: f"{run_dir(**run)}/model.pt" for m, run in runs.items()}


def shift_source(dataset, backbone, seed):
    """What the shift study adapts: one of its backbones (with its source feature statistics), or the
    model another study trained (studies.shift.source_model), which has none."""
    source = config["studies"]["shift"]["source_model"]
    if source is None:
        folder = backbone_dir("shift", dataset, seed, backbone)
        return {"model": f"{folder}/model.pt", "stats": f"{folder}/feature_stats.pt"}
    return {"model": f"{run_dir(source['study'], dataset, source['method'], source['setting'], seed)}/model.pt"}


def job_spec(text):
    """A job's spec (JSON text) as the file the job reads, named by its content: a short command
    line, and a changed spec is a changed parameter that re-runs the job (written in real runs only)."""
    return spec_file(config, text, write=not workflow.dryrun)


def train_spec(wildcards):
    """A training job's run spec file."""
    w = wildcards
    return job_spec(run_spec(config, w.study, w.dataset, w.method, w.setting, int(w.seed)).to_json())


def study_metrics(study):
    return [f"{run_dir(**run)}/metrics.json" for run in study_grid(config, study)]


def study_backbone_metrics(study):
    """The metrics.json of the backbones a study's runs start from (none for studies that train from
    scratch or adapt another study's runs)."""
    return [f"{backbone_dir(**start)}/metrics.json" for start in backbone_runs(config, study)]


def claims_file():
    """The claims ledger's file (config key claims.file; a relative path is relative to the repository)."""
    return Path(workflow.basedir).parent / config["claims"]["file"]


def paper_reference(study):
    """The paper's reported numbers for a study and the names mapping, when recorded:
    [config/reference/<study>.csv, config/reference/names.yaml] or []."""
    folder = Path(workflow.basedir).parent / "config" / "reference"
    path = folder / f"{study}.csv"
    return [str(path), str(folder / "names.yaml")] if path.is_file() else []


def reference_args(wildcards, input):
    """The report CLIs' options for the paper's numbers (input.reference from paper_reference), or ""."""
    return f"--reference {input.reference[0]} --names {input.reference[1]}" if input.reference else ""


def paired_args(study):
    """The report CLI's option naming the method a study's runs are paired with (mmrepro.report.paired), or ""."""
    method = paired_reference(config, study)
    return f"--paired-with {method}" if method else ""


def report_groups(study):
    """The study's report groups as a shell-quoted JSON argument (mmrepro.report.groups)."""
    return shlex.quote(json.dumps(config["studies"][study]["report_groups"]))


def study_specs(study):
    """The run specs of a study's grid: what each run's config.json will hold."""
    return [run_spec(config, study, r["dataset"], r["method"], r["setting"], r["seed"], r.get("backbone"))
            for r in study_grid(config, study)]


# The missing study's curves: name -> file stem, x axis (for the report's labels), CLI option.
MISSING_CURVE_STEMS = {"test": "missing_rates", "train": "missing_train_rates", "prompt": "missing_prompt_lengths"}
MISSING_CURVE_X = {"test": "test missing rate", "train": "training missing rate", "prompt": "prompt length"}
MISSING_CURVE_OPTIONS = {"test": "--plot", "train": "--train-rate-plot", "prompt": "--prompt-length-plot"}


@cache
def missing_curves():
    """The missing study's curves that will have a line, name -> file stem (none without the study)."""
    if "missing" not in config["studies"]:
        return {}
    return {c: MISSING_CURVE_STEMS[c] for c in planned_curves(study_specs("missing"))}


@cache
def cggm_figure():
    """Whether the balance runs give CGGM's Figure 5 a point."""
    return "balance" in config["studies"] and planned_figure5(study_specs("balance"))


def study_report(study):
    """A study's runs in MLflow, its table and plot, its curves (per epoch of training; shift: target
    error along adaptation), its paired differences where it has a reference row beside another method, for a missing study with per-case settings its Table 1 layout and
    curves (test rate, training rate, prompt length), and for the balance study the CGGM paper's
    Tables 5, 6 and Figure 5."""
    files = [f"{RESULTS}/tracking/{study}.json"] + [f"{RESULTS}/tables/{study}.{ext}" for ext in ("md", "csv", "tex", "html")] + [
        f"{RESULTS}/tables/paper/{study}.{ext}" for ext in ("md", "html")] + [
        f"{RESULTS}/plots/{study}{suffix}.{ext}" for suffix in ("", "_curves") for ext in ("png", "pdf")
    ]
    if paired_planned(config, study):
        files += [f"{RESULTS}/plots/{study}_paired.{ext}" for ext in ("png", "pdf")]
    if study == "missing" and any(s["type"] in ("missing", "available") for s in config["studies"][study]["settings"].values()):
        files += [f"{RESULTS}/tables/missing_cases.{ext}" for ext in ("md", "csv", "html")]
        files += [f"{RESULTS}/plots/{stem}.{ext}" for stem in missing_curves().values() for ext in ("png", "pdf")]
    if study == "balance":
        files += [f"{RESULTS}/tables/balance_cggm.md"]
        files += [f"{RESULTS}/plots/balance_cggm.{ext}" for ext in ("png", "pdf") if cggm_figure()]
    return files
