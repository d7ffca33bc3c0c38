"""MLflow tracking: where the store is, creating it once, and logging one job as one run.

- The store is ``sqlite:///<results>/mlflow.db`` unless the config names a URI, and the
  ``MLFLOW_TRACKING_URI`` environment variable overrides both (a tracking server on a cluster).
- MLflow creates its tables on first use, which is not safe under concurrent first writers, so a
  local rule calls :func:`init_store` once before any parallel job; it also creates one
  experiment per study with an explicit artifact location (without a server, MLflow would fix
  it relative to whatever directory the first job ran in).
- Every run is tagged with study, dataset, method, setting, seed (and, on the shift study's backbone
  axis, backbone), git commit, config hash, torch version and threads (a run on random stand-in
  data also with ``rehearsal``: the stand-in's scale), and named by what differs inside a study
  (``[backbone/]method/setting/seedN``);
  parameters are the flattened run spec; per-step values are logged with their ``step`` under
  ``loss/`` or ``monitor/`` (:func:`series_key`); the final metrics as ``<split>/<metric>`` (what
  :mod:`mmrepro.compare` reads back); the resolved config and metrics.json are artifacts.
- As a user meets it in ``mlflow ui``: a run's charts open on its loss curves, a deferred run's
  Duration is its job's (from ``timings.json``), and every experiment carries a shared view,
  ``?viewStateShareKey=compare``, whose columns are the tags and main metrics a comparison needs.
  Which page an experiment opens on is the browser's choice in MLflow 3.17, not the store's:
  :mod:`mmrepro.mlflow_ui` makes it the training runs.
- A local store follows its results folder: MLflow keeps artifact locations absolute, so a moved or
  copied folder's store is pointed at its own ``mlartifacts`` (:func:`relocate_artifacts`), and a
  run's identity is its id in the store, not the store's path.
- When runs reach MLflow (``tracking.mode``): ``live`` logs each epoch as the job runs (what a user
  watching a tracking server wants); ``deferred`` leaves MLflow out of the job, whose files already
  hold everything, and :func:`ingest_runs` logs a study's finished runs in one process (the
  ``track`` rule). Importing MLflow and opening a sqlite store costs a job several seconds, more
  than a small run's compute, so ``auto`` (the default) is live for a server, deferred for a local
  store. Both log the same tags, parameters, per-step metrics and artifacts.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mmrepro.spec import RunSpec

TAG_KEYS = ("study", "dataset", "backbone", "method", "setting", "seed")
#: The tag of a run trained on random stand-in data (its value: the stand-in scale): a rehearsal, no result.
REHEARSAL_TAG = "rehearsal"
#: MLflow's own mark of an experiment's kind. MLflow 3.17's UI does not read it (its GenAI / Model
#: training switch decides every experiment's first page: :mod:`mmrepro.mlflow_ui`); other MLflow
#: front ends and versions do.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
#: A view the UI loads from an experiment tag ``mlflow.sharedViewState.<key>`` when the page's URL
#: has ``?viewStateShareKey=<key>`` (plain JSON is accepted).
SHARED_VIEW_PREFIX, COMPARE_VIEW = "mlflow.sharedViewState.", "compare"
#: Final metrics are logged as ``<split>/<metric>``; these are the views' metric columns.
VIEW_METRICS = ("test/mae", "test/acc", "test/dice_mean")
#: Where per-step series are logged. A run's page in MLflow 3.17 groups its charts in sections named
#: by the key's part before the last ``/``, in name order, keys without one last: ``loss/`` comes
#: before the single-point ``oracle/``, ``params/``, ``test/`` and ``valid/`` charts, ``monitor/``
#: (probe accuracies, coefficients, learning rate, target error) right after it.
LOSS_SERIES, MONITOR_SERIES = "loss/", "monitor/"


def series_key(name: str) -> str:
    """The MLflow key of a per-step series (``train_loss`` -> ``loss/train_loss``); history.json keeps ``name``."""
    return (LOSS_SERIES if "loss" in name else MONITOR_SERIES) + name


def default_run_name(spec: RunSpec) -> str:
    """What differs between runs inside a study (the dataset is a column of its own)."""
    axis = f"{spec.backbone}/" if spec.backbone is not None else ""
    return f"{axis}{spec.method}/{spec.setting}/seed{spec.seed}"


def compare_view() -> str:
    """The shared view's state: tags and main metrics as columns, newest first."""
    columns = [f"tags.`{k}`" for k in TAG_KEYS[1:]] + [f"metrics.`{m}`" for m in VIEW_METRICS]
    return json.dumps({"selectedColumns": ["attributes.`Duration`", *columns], "orderByKey": "attributes.start_time",
                       "orderByAsc": False})


def artifact_root(results: Path | str) -> Path:
    """Where a local store's artifacts live: inside the results folder, so they move with it."""
    return Path(results) / "mlartifacts"


def tracking_uri(results: Path | str, configured: str | None = None) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if configured:
        return configured
    return f"sqlite:///{Path(results).resolve() / 'mlflow.db'}"


def cluster_store_problem(configured: str | None) -> str | None:
    """Why a job on a SLURM node must not use the default store, or None where it may.

    SQLite locks a file with POSIX locks, which network filesystems (NFS, Lustre, GPFS) honour
    partly or not at all: jobs on several nodes writing one ``mlflow.db`` on shared storage can
    corrupt it. A job inside a SLURM allocation therefore needs a tracking server (one writer);
    naming a store explicitly (``tracking.uri`` or ``MLFLOW_TRACKING_URI``) is the user's choice.
    """
    if os.environ.get("SLURM_JOB_ID") and not configured and not os.environ.get("MLFLOW_TRACKING_URI"):
        return ("this job runs on a SLURM node and would share the default sqlite store with jobs on other nodes, "
                "which SQLite's file locks on a network filesystem do not make safe; start an MLflow server and "
                "export MLFLOW_TRACKING_URI=http://<host>:<port> (docs/cluster.md 'Tracking on a cluster')")
    return None


def server_problem(uri: str, timeout: float = 10) -> str | None:
    """Why a job could not log to the tracking server at ``uri`` (http or https), or None where it can.

    Asks the tracking API itself (a search for one experiment), with the Host header and credentials
    (``MLFLOW_TRACKING_TOKEN`` or ``_USERNAME``/``_PASSWORD``) the MLflow client in a job sends:
    ``/health`` answers even where MLflow 3.17 refuses every API call with 403 because the Host
    header the jobs use is not in the server's ``--allowed-hosts``. One request, no retries.
    """
    import base64  # here: a job that never asks a server does not pay for urllib's imports
    import urllib.error
    import urllib.parse
    import urllib.request

    request = urllib.request.Request(f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1")
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        request.add_header("Authorization", f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}")
    elif os.environ.get("MLFLOW_TRACKING_USERNAME"):
        pair = f"{os.environ['MLFLOW_TRACKING_USERNAME']}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}"
        request.add_header("Authorization", "Basic " + base64.b64encode(pair.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            reply.read()
        return None
    except urllib.error.HTTPError as e:
        body = " ".join(e.read().decode(errors="replace").split())[:300]
        problem = f"tracking server {uri} refuses the tracking API: {e.code} {body or e.reason}"
        if e.code == 403 and "Host" in body:
            url = urllib.parse.urlsplit(uri)
            hosts = f"{url.hostname},{url.hostname}:{url.port}" if url.port else url.hostname
            problem += (f"; start the server with --allowed-hosts '{hosts}' (the name the jobs use in "
                        "MLFLOW_TRACKING_URI; docs/cluster.md 'Tracking on a cluster')")
        return problem
    except OSError as e:
        return f"tracking server {uri} does not answer ({e})"


def is_local(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:", "/")) or "://" not in uri


TRACKING_MODES = ("auto", "live", "deferred")


def tracking_mode(uri: str, configured: str = "auto") -> str:
    """``live`` or ``deferred`` for a store: ``auto`` is live for a tracking server, deferred for a local store."""
    if configured not in TRACKING_MODES:
        raise ValueError(f"tracking.mode must be one of {TRACKING_MODES}, got {configured!r}")
    if configured != "auto":
        return configured
    return "deferred" if is_local(uri) else "live"


def init_store(uri: str, experiments: list[str], artifact_root: Path) -> dict[str, str]:
    """Create the store's tables and the experiments, marked for training runs and with the
    comparison view (idempotent, also for experiments made before, and for a store whose results
    folder moved); return name -> experiment id."""
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
    relocate_artifacts(uri, artifact_root)
    return ids


def relocate_artifacts(uri: str, artifact_root: Path) -> list[str]:
    """Point the experiments of a moved sqlite store, and their runs, at ``artifact_root``; return their names.

    MLflow stores artifact locations as absolute paths (a relative one is resolved against the
    working directory when the experiment is created, and its API cannot change one later), so a
    store copied or moved with its results folder would read, and write, the old folder's
    artifacts. An experiment :func:`init_store` made lives at ``<artifact_root>/<name>``; one found
    at ``<elsewhere>/<artifact_root's name>/<name>`` is moved there, with its runs' artifact URIs.
    Other stores (and a store not made yet) and other experiments are left alone.
    """
    if not uri.startswith("sqlite:"):
        return []
    import sqlite3
    from contextlib import closing
    from urllib.parse import unquote, urlparse

    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    if not database or not Path(database).is_file():
        return []
    root = Path(artifact_root).resolve()
    moved = []
    with closing(sqlite3.connect(database, timeout=60)) as db, db:
        for exp_id, name, location in db.execute("SELECT experiment_id, name, artifact_location FROM experiments"):
            new = (root / name).as_uri()
            if not (location or "").startswith("file:") or location == new:
                continue
            path = Path(unquote(urlparse(location).path))
            if (path.parent.name, path.name) != (root.name, name):
                continue
            db.execute("UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) "
                       "WHERE experiment_id = ? AND substr(artifact_uri, 1, ?) = ?",
                       (new, len(location) + 1, exp_id, len(location), location))
            db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?", (new, exp_id))
            moved.append(name)
    return moved


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


def config_hash(doc: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:12]


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_tags(spec: RunSpec, threads: int) -> dict[str, str]:
    """The tags of a job's run, fixed when the job runs (a deferred run is logged later with these)."""
    tags = {k: str(getattr(spec, k)) for k in TAG_KEYS if getattr(spec, k) is not None}
    tags.update(git_commit=git_commit(), config_hash=config_hash(spec.to_dict()),
                torch_version=importlib.metadata.version("torch"), threads=str(threads))
    if spec.stand_in is not None:  # searchable (tags.rehearsal = 'tiny') and shown beside every such run
        tags[REHEARSAL_TAG] = spec.stand_in
    return tags


class RunTracker:
    """One MLflow run for one job: ``with RunTracker(...) as run: run.log_metrics(...)``.

    The experiment must exist (created by the init rule); a job never creates tables. ``tags``
    given replace the ones computed now (a search's trial adds ``mlflow.parentRunId`` to
    :func:`run_tags`; a deferred run is logged after its job with the tags it recorded); setting
    ``status`` inside the block overrides the final one (``KILLED``
    for a pruned trial). ``start`` and ``end`` (Unix seconds) are the run's when it is logged after
    its job (else the block's); its metrics are then stamped with ``end``.
    """

    run_id: str | None = None

    def __init__(self, uri: str, experiment: str, spec: RunSpec, threads: int, run_name: str | None = None,
                 tags: Mapping[str, str] | None = None, start: float | None = None, end: float | None = None):
        self.uri, self.experiment, self.spec = uri, experiment, spec
        self.run_name = run_name or default_run_name(spec)
        self.tags = dict(tags) if tags is not None else run_tags(spec, threads)
        self.start, self.end = start, end
        self.status: str | None = None

    def __enter__(self) -> "RunTracker":
        import mlflow

        self.client = mlflow.MlflowClient(tracking_uri=self.uri)
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            raise RuntimeError(f"MLflow experiment {self.experiment!r} does not exist at {self.uri}; "
                               "run the init_tracking rule (snakemake does this first)")
        run = self.client.create_run(exp.experiment_id, run_name=self.run_name, tags=self.tags,
                                     start_time=_ms(self.start))
        self.run_id = run.info.run_id
        params = flatten(self.spec.to_dict())
        from mlflow.entities import Param

        items = [Param(k[:250], v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])
        return self

    def log_metrics(self, values: Mapping[str, float], step: int) -> None:
        """One step of the run's series (logged under :func:`series_key`)."""
        self.log_series([(step, values)])

    def log_series(self, steps: Iterable[tuple[int, Mapping[str, float]]]) -> None:
        """Many steps of the run's series, in as few requests as MLflow allows."""
        self._log([(step, {series_key(k): v for k, v in values.items()}) for step, values in steps])

    def log_values(self, values: Mapping[str, float], step: int = 0) -> None:
        """Single values under their own names (a trial's objective; :meth:`log_summary`'s metrics)."""
        self._log([(step, values)])

    def _log(self, steps: Iterable[tuple[int, Mapping[str, float]]]) -> None:
        from mlflow.entities import Metric

        ts = _ms(self.end) or int(time.time() * 1000)
        metrics = [Metric(k, float(v), ts, step) for step, values in steps for k, v in values.items()]
        for i in range(0, len(metrics), 1000):  # MLflow takes 1000 metrics a request
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        """A run's metrics.json as what the UI shows and :mod:`mmrepro.compare` reads back: final
        metrics ``<split>/<metric>``, oracle ``oracle/<split>/<metric>``, ``params/trainable`` and
        ``params/backbone``, and the task, backbone and ``target_labels_used`` (``true``/``false``,
        where metrics.json has it) as tags."""
        values = {f"{split}/{k}": v for split, vals in summary["metrics"].items() for k, v in vals.items()}
        values.update({f"oracle/{split}/{k}": v for split, vals in (summary.get("oracle") or {}).items()
                       for k, v in vals.items()})
        values.update({f"params/{k}": summary[f"{k}_params"] for k in ("trainable", "backbone")
                       if summary.get(f"{k}_params") is not None})
        self.log_values({k: v for k, v in values.items() if v is not None}, step=summary.get("best_epoch", 0))
        for key in ("task", "backbone"):
            self.client.set_tag(self.run_id, key, str(summary[key]))
        if "target_labels_used" in summary:
            self.client.set_tag(self.run_id, "target_labels_used", str(bool(summary["target_labels_used"])).lower())

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def __exit__(self, exc_type, exc, tb) -> None:
        self.client.set_terminated(self.run_id, status=self.status or ("FAILED" if exc_type else "FINISHED"),
                                   end_time=_ms(self.end))


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else int(seconds * 1000)


class DeferredRun:
    """A job's run while tracking is deferred: MLflow is not touched (nor imported); the job's files
    are the record, and :func:`ingest_runs` logs them once the job is done."""

    run_id: str | None = None

    def __init__(self, spec: RunSpec, threads: int, run_name: str | None = None):
        self.run_name = run_name or default_run_name(spec)
        self.tags = run_tags(spec, threads)

    def __enter__(self) -> "DeferredRun":
        return self

    def log_metrics(self, values: Mapping[str, float], step: int) -> None:
        """Nothing now: the values are in the job's history.json."""

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        """Nothing now: the summary is the job's metrics.json."""

    def log_artifact(self, path: Path) -> None:
        """Nothing now: the file stays in the run folder and is logged at ingestion."""

    def __exit__(self, exc_type, exc, tb) -> None:
        return None


def open_run(spec: RunSpec, threads: int, run_name: str | None = None) -> RunTracker | DeferredRun:
    """The run a job logs to: live in MLflow, or deferred to :func:`ingest_runs` (``tracking.mode``)."""
    uri = tracking_uri(spec.results, spec.tracking.uri)
    if tracking_mode(uri, spec.tracking.mode) == "live":
        return RunTracker(uri, spec.study, spec, threads, run_name=run_name)
    return DeferredRun(spec, threads, run_name)


def history_steps(history: Iterable[Mapping[str, float]]) -> list[tuple[int, dict[str, float]]]:
    """``history.json`` entries (keyed by ``epoch``, ``step`` or ``batch``) as ``(step, values)`` pairs."""
    out = []
    for entry in history:
        key = next((k for k in STEP_KEYS if k in entry), None)
        out.append((int(entry[key]) if key else 0, {k: v for k, v in entry.items() if k not in STEP_KEYS}))
    return out


#: Keys of a history entry that say where it lies (one per entry), not what was measured.
STEP_KEYS = ("epoch", "step", "batch")


def log_outcome(run: RunTracker | DeferredRun, out_dir: Path, summary: Mapping[str, Any]) -> None:
    """A finished job's summary (:meth:`RunTracker.log_summary`) and its files."""
    run.log_summary(summary)
    for name in ("config.json", "metrics.json", "history.json"):
        run.log_artifact(Path(out_dir) / name)


def record(run: RunTracker | DeferredRun, out_dir: Path, uri: str) -> None:
    """``tracking.json``: where the run was logged (``run_id`` null while deferred) and its tags."""
    path = Path(out_dir) / "tracking.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"uri": uri, "run_id": run.run_id, "run_name": run.run_name, "tags": run.tags},
                              indent=1, sort_keys=True))
    os.replace(tmp, path)


def job_span(out_dir: Path) -> dict[str, float]:
    """The job's wall-clock ``start`` and ``end`` from its ``timings.json`` (empty for a run of a
    version that did not record them: its run then spans its logging)."""
    path = Path(out_dir) / "timings.json"
    try:
        timings = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return {k: float(timings[k]) for k in ("start", "end") if k in timings}


def _in_store(client: Any, run_id: str | None) -> bool:
    from mlflow.exceptions import MlflowException

    if run_id is None:
        return False
    try:
        client.get_run(run_id)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True


def ingest_runs(uri: str, run_dirs: Iterable[Path]) -> dict[str, str]:
    """Log finished runs whose ``tracking.json`` names no run in this store; return folder -> run id.

    Idempotent: a run logged live, or ingested before, is left alone (its id is returned), wherever
    the store and the run folders have been moved or copied since. A run logged now spans its job
    (:func:`job_span`).
    """
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    ids = {}
    for out_dir in map(Path, run_dirs):
        info = json.loads((out_dir / "tracking.json").read_text())
        if not _in_store(client, info["run_id"]):
            spec = RunSpec.from_json((out_dir / "config.json").read_text())
            with RunTracker(uri, spec.study, spec, 0, run_name=info["run_name"], tags=info["tags"],
                            **job_span(out_dir)) as run:
                run.log_series(history_steps(json.loads((out_dir / "history.json").read_text())))
                log_outcome(run, out_dir, json.loads((out_dir / "metrics.json").read_text()))
            record(run, out_dir, uri)
            info["run_id"] = run.run_id
        ids[out_dir.as_posix()] = info["run_id"]
    return ids
