"""MLflow tracking: where the store is, creating it once, and logging one job as one run.

- The store is ``sqlite:///<results>/mlflow.db`` unless the config names a URI, and the
  ``MLFLOW_TRACKING_URI`` environment variable overrides both (a tracking server on a cluster).
- MLflow creates its tables on first use, which is not safe under concurrent first writers, so a
  local rule calls :func:`init_store` once before any parallel job; it also creates one
  experiment per study with an explicit artifact location (without a server, MLflow would fix
  it relative to whatever directory the first job ran in).
- Every run is tagged with study, dataset, method, setting, seed, git commit, config hash, torch
  version and threads; parameters are the flattened run spec; per-epoch values are logged with
  their ``step``; the resolved config and metrics.json are artifacts.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

TAG_KEYS = ("study", "dataset", "method", "setting", "seed")


def tracking_uri(results: Path | str, configured: str | None = None) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if configured:
        return configured
    return f"sqlite:///{Path(results).resolve() / 'mlflow.db'}"


def is_local(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:", "/")) or "://" not in uri


def init_store(uri: str, experiments: list[str], artifact_root: Path) -> dict[str, str]:
    """Create the store's tables and the experiments (idempotent); return name -> experiment id."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    ids = {}
    for name in experiments:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            location = (Path(artifact_root).resolve() / name).as_uri() if is_local(uri) else None
            ids[name] = client.create_experiment(name, artifact_location=location)
        else:
            ids[name] = exp.experiment_id
    return ids


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": "0.001"}`` (MLflow params are flat strings)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return out


def config_hash(spec: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_tags(spec: Mapping[str, Any], threads: int) -> dict[str, str]:
    """The tags of a job's run, fixed when the job runs (a deferred run is logged later with these)."""
    tags = {k: str(spec[k]) for k in TAG_KEYS if k in spec}
    tags.update(git_commit=git_commit(), config_hash=config_hash(spec),
                torch_version=importlib.metadata.version("torch"), threads=str(threads))
    return tags


class RunTracker:
    """One MLflow run for one job: ``with RunTracker(...) as run: run.log_metrics(...)``.

    The experiment must exist (created by the init rule); a job never creates tables. ``tags``
    given replace the ones computed now (a search's trial adds ``mlflow.parentRunId`` to
    :func:`run_tags`); setting ``status`` inside the block overrides the final one (``KILLED``
    for a pruned trial).
    """

    def __init__(self, uri: str, experiment: str, spec: Mapping[str, Any], threads: int, run_name: str,
                 tags: Mapping[str, str] | None = None):
        self.uri, self.experiment, self.spec, self.run_name = uri, experiment, spec, run_name
        self.tags = dict(tags) if tags is not None else run_tags(spec, threads)
        self.status: str | None = None

    def __enter__(self) -> "RunTracker":
        import mlflow

        self.client = mlflow.MlflowClient(tracking_uri=self.uri)
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            raise RuntimeError(f"MLflow experiment {self.experiment!r} does not exist at {self.uri}; "
                               "run the init_tracking rule (snakemake does this first)")
        run = self.client.create_run(exp.experiment_id, run_name=self.run_name, tags=self.tags)
        self.run_id = run.info.run_id
        params = flatten(self.spec)
        from mlflow.entities import Param

        items = [Param(k[:250], v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])
        return self

    def log_metrics(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        metrics = [Metric(k, float(v), ts, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def __exit__(self, exc_type, exc, tb) -> None:
        self.client.set_terminated(self.run_id, status=self.status or ("FAILED" if exc_type else "FINISHED"))
