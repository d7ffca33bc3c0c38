"""``mmrepro doctor``: is this machine ready to run the workflow, and if not, what to fix.

Checks, each reported as ok / warn / FAIL with the fix: package versions, CPU threads, GPU, the
config, the MLflow store (reachable, initialised), and every configured dataset (feature store
present and matching its checksums, or raw data present). Read-only: it creates, records and
downloads nothing. FAIL means a run would break; warn means the workflow will make it, or it
runs but slowly.
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

import yaml

from mmrepro.config import EXPERIMENTS
from mmrepro.tracking import server_problem

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
    from mmrepro.config import ConfigError, load_schema, merge_config, validate_config  # noqa: I001

    config: dict[str, Any] = {}
    try:
        for path in files:
            merge_config(config, yaml.safe_load(Path(path).read_text()) or {})
        validate_config(config, load_schema(schema))
    except (OSError, yaml.YAMLError, ConfigError) as e:
        return None, Check("config", "FAIL", str(e), "fix the named key or file (mmrepro check-config ...)")
    return config, Check("config", "ok", f"{', '.join(map(str, files))} valid")


def tracking(uri: str) -> Check:
    """A server answers its tracking API as it will answer the jobs; a sqlite file exists with its
    experiments (the init rule made them)."""
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
                return Check("tracking", "warn", f"{path} not created yet", "snakemake's init_tracking rule creates it")
            return Check("tracking", "FAIL", f"{path}: folder not writable", "choose another results folder")
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as db:
                names = [r[0] for r in db.execute("SELECT name FROM experiments WHERE lifecycle_stage = 'active'")]
        except sqlite3.Error as e:
            return Check("tracking", "FAIL", f"{path} is not a readable MLflow store ({e})",
                         f"move {path} aside and rerun (snakemake re-runs init_tracking)")
        missing = [e for e in EXPERIMENTS if e not in names]
        if missing:
            return Check("tracking", "warn", f"{uri}: experiments {missing} not created yet",
                         "snakemake's init_tracking rule creates them")
        return Check("tracking", "ok", f"{uri}: experiments {', '.join(EXPERIMENTS)}")
    return Check("tracking", "warn", f"{uri}: not checked (only sqlite and http(s) stores are)")


def dataset(name: str, config: dict[str, Any]) -> Check:
    from mmrepro.config import dataset_path
    from mmrepro.data.schema import DataValidationError
    from mmrepro.data.store import MANIFEST, FeatureStore

    manifest = Path(config["results"]) / "data" / name / MANIFEST
    if manifest.is_file():
        try:
            FeatureStore(manifest).verify()
        except DataValidationError as e:
            return Check(f"data {name}", "FAIL", str(e),
                         f"remove {manifest.parent} and rerun snakemake (make_data rebuilds it)")
        return Check(f"data {name}", "ok", f"{manifest.parent}: every array matches its checksum")
    raw = dataset_path(config, name)
    if raw is None:
        return Check(f"data {name}", "warn", "store not built yet", "snakemake builds it (make_data)")
    if Path(raw).exists():
        return Check(f"data {name}", "warn", f"raw data at {raw}; store not built yet",
                     "snakemake converts it (make_data verifies the raw checksum first)")
    entry = config["datasets"][name]
    if entry.get("stand_in") and not Path(entry["path"]).is_absolute():
        return Check(f"data {name}", "warn", f"{raw} absent", f"snakemake writes the random stand-in (fetch_{name})")
    source = entry.get("source", {})
    if source.get("url") and not source.get("gated"):
        return Check(f"data {name}", "warn", f"{raw} absent", f"snakemake downloads it (fetch_{name})")
    return Check(f"data {name}", "FAIL", f"{raw} absent and cannot be downloaded automatically",
                 f"mmrepro fetch prints the manual steps (snakemake fetch_{name}), see docs/datasets.md")


def run_checks(config_files: list[Path], schema: Path) -> list[Check]:
    from mmrepro.tracking import cluster_store_problem, tracking_uri

    config, checked = load_config(config_files, schema)
    out = [*versions(), threads(), gpu(config), checked]
    if config is not None:
        problem = cluster_store_problem(config["tracking"]["uri"])
        out.append(Check("tracking", "FAIL", problem, "start an MLflow server (docs/cluster.md 'Tracking on a cluster')")
                   if problem else tracking(tracking_uri(config["results"], config["tracking"]["uri"])))
        used = {d for study in config["studies"].values() for d in study["datasets"]}
        out += [dataset(name, config) for name in sorted(used)]
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
