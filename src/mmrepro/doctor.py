"""``mmrepro doctor``: is this machine ready to run the workflow, and if not, what to fix.

Checks, each reported as ok / warn / FAIL with the fix: package versions, CPU threads, GPU, the
config, the folders a run writes to (results, raw downloads, Snakemake's records), the MLflow
store (reachable, initialised), and every configured dataset (feature store present and matching
its checksums, or raw data present; work folders a killed conversion left). Read-only: it
creates, records and downloads nothing. FAIL means a run would break; warn means the workflow
will make it, or it runs but slowly. Fixes are commands to run as printed, with the config files
doctor was given.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmrepro.config import EXPERIMENTS
from mmrepro.tracking import server_problem

DEFAULT_CONFIG = Path("config/config.yaml")  # the Snakefile loads it; other files go after --configfile
PACKAGES = ("mmrepro", "torch", "numpy", "mlflow", "snakemake", "optuna", "snakemake-executor-plugin-slurm")
REQUIRED = ("torch", "numpy", "mlflow", "snakemake")
OPTIONAL = {"snakemake-executor-plugin-slurm": "slurm"}  # package -> the extra that installs it


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # "ok" | "warn" | "FAIL"
    detail: str
    fix: str = ""


def versions() -> list[Check]:
    out = [Check("python", "ok", f"{platform.python_version()} ({platform.machine()})")]
    for pkg in PACKAGES:
        try:
            out.append(Check(pkg, "ok", importlib.metadata.version(pkg)))
        except importlib.metadata.PackageNotFoundError:
            if pkg in REQUIRED:
                out.append(Check(pkg, "FAIL", "not installed", "pip install -e . (in the project's environment)"))
            else:
                out.append(Check(pkg, "warn", "not installed", f"pip install -e '.[{OPTIONAL.get(pkg, 'test')}]' "
                                                               "if you need it"))
    mmrepro = shutil.which("mmrepro")
    if mmrepro is None:
        out.append(Check("mmrepro on PATH", "FAIL", "the rules call `mmrepro`, which is not on PATH",
                         "activate the project's environment (or put its bin/ first on PATH)"))
    else:
        out.append(Check("mmrepro on PATH", "ok", mmrepro))
    return out


def threads() -> Check:
    import torch

    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    omp = os.environ.get("OMP_NUM_THREADS")
    detail = f"{available} CPU(s) available, torch uses {torch.get_num_threads()}, OMP_NUM_THREADS={omp or 'unset'}"
    if torch.get_num_threads() > available:
        return Check("threads", "warn", detail, "torch would oversubscribe the CPUs: set OMP_NUM_THREADS")
    return Check("threads", "ok", detail)


def gpu(config: dict[str, Any] | None) -> Check:
    import torch

    wants = config is not None and (config["train"]["device"] == "cuda" or config["resources"]["train"]["gpu"] > 0)
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        return Check("gpu", "ok", f"CUDA {torch.version.cuda}: {names}")
    detail = f"no CUDA device (torch {torch.__version__} {'has' if torch.version.cuda else 'without'} CUDA support)"
    if wants:
        return Check("gpu", "FAIL", detail + "; the config asks for a GPU (train.device or resources.train.gpu)",
                     "run on a GPU node, or set train.device: auto and resources.train.gpu: 0")
    return Check("gpu", "ok", detail + "; training runs on CPU")


def load_config(files: list[Path], schema: Path) -> tuple[dict[str, Any] | None, Check]:
    from mmrepro.config import ConfigError, load_schema, read_config_files, validate_config  # noqa: I001

    try:
        config = validate_config(read_config_files(files), load_schema(schema))
    except (OSError, ConfigError) as e:
        return None, Check("config", "FAIL", str(e), "fix the named key or file (mmrepro check-config ...)")
    return config, Check("config", "ok", f"{', '.join(map(str, files))} valid")


def snakemake_command(target: str, config_files: list[Path], cores: str = "all") -> str:
    """The command that makes ``target`` with these config files (targets go before --configfile,
    which reads every word after it as a file; config/config.yaml is loaded without being named)."""
    extra = [str(p) for p in config_files if Path(p).resolve() != DEFAULT_CONFIG.resolve()]
    return f"snakemake --cores {cores} {target}" + (f" --configfile {' '.join(extra)}" if extra else "")


def _writable_folder(path: Path) -> Path | None:
    """None when a job can write under ``path`` (made if absent); else the folder that refuses."""
    for folder in (path, *path.parents):
        if folder.exists():
            return None if folder.is_dir() and os.access(folder, os.W_OK | os.X_OK) else folder
    return None


def writable(config: dict[str, Any]) -> list[Check]:
    """The folders a run writes to: the results folder (and the folders and tracking store already in
    it), the raw-data root where a dataset must still be downloaded, and Snakemake's records
    (.snakemake in the working directory)."""
    from mmrepro.config import dataset_path

    results = Path(config["results"])
    places = [(results, "results", "every output of a run")]
    if results.is_dir():
        places += [(p, "results", "outputs of a run") for p in sorted(results.iterdir()) if p.is_dir()]
    to_fetch = [n for n in config["datasets"] if dataset_path(config, n) and not Path(dataset_path(config, n)).exists()]
    if to_fetch:
        places.append((Path(config["data_root"]), "data_root", f"downloads of {', '.join(sorted(to_fetch))}"))
    places.append((Path(".snakemake"), None, "Snakemake's locks and job records"))
    out = []
    for path, key, what in places:
        refused = _writable_folder(path)
        if refused is not None:
            set_key = f", or set {key}: to a writable folder in a config file" if key else \
                ", or run snakemake from a writable folder (--directory)"
            out.append(Check("writable", "FAIL", f"{refused} is not a writable folder; a run writes {what} there",
                             f"chmod -R u+w {refused}{set_key}"))
    store = results / "mlflow.db"
    if store.is_file() and not os.access(store, os.W_OK):
        out.append(Check("writable", "FAIL", f"{store} is read-only; every run logs to it",
                         f"chmod u+w {store}"))
    return out or [Check("writable", "ok", f"{results}, {config['data_root']} and .snakemake can be written")]


def tracking(uri: str, init: str = "snakemake --cores 1 init_tracking") -> Check:
    """A server answers its tracking API as it will answer the jobs; a sqlite file exists with its
    experiments (the init rule made them). ``init``: the command that creates the store."""
    if uri.startswith(("http://", "https://")):
        problem = server_problem(uri)
        if problem:
            return Check("tracking", "FAIL", problem,
                         "start it (mlflow server ..., see docs/cluster.md 'Tracking on a cluster') or unset MLFLOW_TRACKING_URI")
        return Check("tracking", "ok", f"server {uri} answers its tracking API")
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if not path.is_file():
            if os.access(path.parent if path.parent.exists() else Path.cwd(), os.W_OK):
                return Check("tracking", "warn", f"{path} not created yet",
                             f"snakemake creates it first; now: {init}")
            return Check("tracking", "FAIL", f"{path}: folder not writable", "choose another results folder")
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as db:
                names = [r[0] for r in db.execute("SELECT name FROM experiments WHERE lifecycle_stage = 'active'")]
        except sqlite3.Error as e:
            return Check("tracking", "FAIL", f"{path} is not a readable MLflow store ({e})",
                         f"mv {path} {path}.broken && {init}")
        missing = [e for e in EXPERIMENTS if e not in names]
        if missing:
            return Check("tracking", "warn", f"{uri}: experiments {missing} not created yet",
                         f"snakemake creates them first; now: {init}")
        return Check("tracking", "ok", f"{uri}: experiments {', '.join(EXPERIMENTS)}")
    return Check("tracking", "warn", f"{uri}: not checked (only sqlite and http(s) stores are)")


def dataset(name: str, config: dict[str, Any], config_files: list[Path] = (DEFAULT_CONFIG,)) -> Check:
    """A dataset's feature store (verified), else its raw data, with the command that makes what is missing."""
    from mmrepro.config import dataset_path, fetch_rules
    from mmrepro.data.schema import DataValidationError
    from mmrepro.data.store import MANIFEST, FeatureStore

    manifest = Path(config["results"]) / "data" / name / MANIFEST
    build = snakemake_command(str(manifest), list(config_files))
    if manifest.is_file():
        try:
            FeatureStore(manifest).verify()
        except DataValidationError as e:
            return Check(f"data {name}", "FAIL", str(e), f"rm -r {manifest.parent} && {build}")
        return Check(f"data {name}", "ok", f"{manifest.parent}: every array matches its checksum")
    raw = dataset_path(config, name)
    if raw is None:
        return Check(f"data {name}", "warn", "store not built yet", f"snakemake builds it first; now: {build}")
    if Path(raw).exists():
        return Check(f"data {name}", "warn", f"raw data at {raw}; store not built yet",
                     f"snakemake converts it first (after checking the raw checksum); now: {build}")
    fetch = snakemake_command(f"fetch_{fetch_rules(config)[raw]}", list(config_files), cores="1")
    entry = config["datasets"][name]
    if entry.get("stand_in") and not Path(entry["path"]).is_absolute():
        return Check(f"data {name}", "warn", f"{raw} absent", f"snakemake writes the random stand-in first; now: {fetch}")
    source = entry.get("source", {})
    if source.get("url") and not source.get("gated"):
        return Check(f"data {name}", "warn", f"{raw} absent", f"snakemake downloads it first; now: {fetch}")
    return Check(f"data {name}", "FAIL", f"{raw} absent and cannot be downloaded automatically",
                 f"{fetch} prints the manual steps; docs/datasets.md says where each file comes from")


def conversion_leftovers(config: dict[str, Any]) -> list[Check]:
    """Work folders of conversions that were killed (make_data removes its own on the next run on
    the same host; one left by another host stays until removed by hand)."""
    from mmrepro.data.store import leftovers

    folders = leftovers(Path(config["results"]) / "data")
    if not folders:
        return []
    size = sum(f.stat().st_size for folder in folders for f in folder.rglob("*") if f.is_file())
    return [Check("data leftovers", "warn", f"{len(folders)} work folder(s) of interrupted conversions, "
                  f"{size / 1e6:.0f} MB: {', '.join(map(str, folders))}",
                  f"rm -r {' '.join(map(str, folders))}  (if no conversion runs now)")]


def run_checks(config_files: list[Path], schema: Path) -> list[Check]:
    from mmrepro.tracking import cluster_store_problem, tracking_uri

    config, checked = load_config(config_files, schema)
    out = [*versions(), threads(), gpu(config), checked]
    if config is not None:
        out += writable(config)
        problem = cluster_store_problem(config["tracking"]["uri"])
        init = snakemake_command("init_tracking", config_files, cores="1")
        out.append(Check("tracking", "FAIL", problem, "start an MLflow server (docs/cluster.md 'Tracking on a cluster')")
                   if problem else tracking(tracking_uri(config["results"], config["tracking"]["uri"]), init))
        used = {d for study in config["studies"].values() for d in study["datasets"]}
        out += [dataset(name, config, config_files) for name in sorted(used)]
        out += conversion_leftovers(config)
    return out


def render(checks: list[Check]) -> str:
    lines = []
    for c in checks:
        lines.append(f"[{c.status:>4}] {c.name}: {c.detail}")
        if c.fix:
            lines.append(f"       fix: {c.fix}")
    broken = sum(c.status == "FAIL" for c in checks)
    lines.append(f"{broken} problem(s) to fix" if broken else "ready: nothing to fix")
    return "\n".join(lines)
