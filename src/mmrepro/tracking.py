"""MLflow tracking: where the store is, creating it once, and logging one job as one run.

- The store is ``sqlite:///<results>/mlflow.db`` unless the config names a URI, and the
  ``MLFLOW_TRACKING_URI`` environment variable overrides both (a tracking server on a cluster).
- MLflow creates its tables on first use, which is not safe under concurrent first writers, so a
  local rule calls :func:`init_store` once before any parallel job; it also creates one
  experiment per study with an explicit artifact location (without a server, MLflow would fix
  it relative to whatever directory the first job ran in).
- Every run is tagged with study, dataset, method, setting, seed, git commit, config hash, torch
  version and threads, and named by what differs inside a study (``method/setting/seedN``);
  parameters are the flattened run spec; per-epoch values are logged with their ``step``; the
  final metrics as ``<split>/<metric>`` (what :mod:`mmrepro.compare` reads back); the resolved
  config and metrics.json are artifacts.
- As a user meets it in ``mlflow ui``: every experiment is marked as model training (MLflow 3
  otherwise opens the GenAI overview) and carries a shared view, ``?viewStateShareKey=compare``,
  whose columns are the tags and main metrics a comparison needs.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

TAG_KEYS = ("study", "dataset", "method", "setting", "seed")
#: The experiment tag MLflow 3's UI reads to choose an experiment's first page (mlflow/server/js:
#: ``"mlflow.experimentKind"``; ``custom_model_development`` opens the training-runs table).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
#: A view the UI loads from an experiment tag ``mlflow.sharedViewState.<key>`` when the page's URL
#: has ``?viewStateShareKey=<key>`` (plain JSON is accepted).
SHARED_VIEW_PREFIX, COMPARE_VIEW = "mlflow.sharedViewState.", "compare"
#: Final metrics are logged as ``<split>/<metric>``; these are the views' metric columns.
VIEW_METRICS = ("test/mae", "test/acc", "test/dice_mean")


def default_run_name(spec: Mapping[str, Any]) -> str:
    """What differs between runs inside a study (the dataset is a column of its own)."""
    return f"{spec['method']}/{spec['setting']}/seed{spec['seed']}"


def compare_view() -> str:
    """The shared view's state: tags and main metrics as columns, newest first."""
    columns = [f"tags.`{k}`" for k in TAG_KEYS[1:]] + [f"metrics.`{m}`" for m in VIEW_METRICS]
    return json.dumps({"selectedColumns": ["attributes.`Duration`", *columns], "orderByKey": "attributes.start_time",
                       "orderByAsc": False})


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
    """Create the store's tables and the experiments, marked for training runs and with the
    comparison view (idempotent, also for experiments made before); return name -> experiment id."""
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
        client.set_experiment_tag(ids[name], *EXPERIMENT_KIND)
        client.set_experiment_tag(ids[name], SHARED_VIEW_PREFIX + COMPARE_VIEW, compare_view())
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


class RunTracker:
    """One MLflow run for one job: ``with RunTracker(...) as run: run.log_metrics(...)``.

    The experiment must exist (created by the init rule); a job never creates tables.
    """

    def __init__(self, uri: str, experiment: str, spec: Mapping[str, Any], threads: int, run_name: str | None = None):
        self.uri, self.experiment, self.spec = uri, experiment, spec
        self.run_name = run_name or default_run_name(spec)
        self.tags = {k: str(spec[k]) for k in TAG_KEYS if k in spec}
        self.tags.update(git_commit=git_commit(), config_hash=config_hash(spec), torch_version=torch.__version__,
                         threads=str(threads))

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

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        """A run's metrics.json as what the UI shows and :mod:`mmrepro.compare` reads back: final
        metrics ``<split>/<metric>``, oracle ``oracle/<split>/<metric>``, ``params/trainable`` and
        ``params/backbone``, and the task and backbone as tags."""
        values = {f"{split}/{k}": v for split, vals in summary["metrics"].items() for k, v in vals.items()}
        values.update({f"oracle/{split}/{k}": v for split, vals in (summary.get("oracle") or {}).items()
                       for k, v in vals.items()})
        values.update({f"params/{k}": summary[f"{k}_params"] for k in ("trainable", "backbone")
                       if summary.get(f"{k}_params") is not None})
        self.log_metrics({k: v for k, v in values.items() if v is not None}, step=summary.get("best_epoch", 0))
        for key in ("task", "backbone"):
            self.client.set_tag(self.run_id, key, str(summary[key]))

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def __exit__(self, exc_type, exc, tb) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if exc_type else "FINISHED")
