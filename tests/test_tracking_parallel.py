"""Parallel jobs and the tracking store: 16 jobs logging at once lose no run, metric or artifact,
on the default sqlite store (after the init rule) and through an MLflow server on loopback (the
cluster mode); and a job on a cluster node refuses a sqlite store shared between nodes."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import mlflow
import pytest

from mmrepro.tracking import RunTracker, init_store, series_key, server_problem
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
    with RunTracker(uri, "balance", replace(SPEC, seed=i), threads=1, run_name=f"job{i}") as run:
        for epoch in range(1, EPOCHS + 1):
            run.log_metrics({"train_loss": i + epoch / 10, "valid_loss": i - epoch / 10}, step=epoch)
        run.log_values({"test_mae": float(i)}, step=EPOCHS)
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
            history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, series_key(name)))
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


@contextlib.contextmanager
def mlflow_server(store: Path, artifacts: Path, host: str = "127.0.0.1"):
    """The tracking server of docs/cluster.md ('Tracking on a cluster'), the single writer of its sqlite file
    ``store``, listening on ``host`` and answering requests addressed to it (``--allowed-hosts``)."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port), "--workers", "1",
         "--allowed-hosts", f"{host},{host}:{port}",
         "--backend-store-uri", f"sqlite:///{store}", "--artifacts-destination", str(artifacts)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        # as docs/cluster.md: no background job runners (tracking only); a fresh sqlite connection per request
        # (the default pool of 15 timed out under 16 jobs: 400 "QueuePool limit ... reached")
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_SQLALCHEMYSTORE_POOLCLASS": "NullPool"})
    uri = f"http://{host}:{port}"
    try:
        deadline = time.monotonic() + 900  # seconds when idle; minutes on a machine shared by many
        while (problem := server_problem(uri, timeout=5)) is not None:  # its API, as the jobs will ask it
            assert server.poll() is None, f"the MLflow server exited ({problem})"
            assert time.monotonic() < deadline, f"the MLflow server did not come up in 15 min ({problem})"
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its workers: the group started here
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_16_jobs_at_once_through_a_tracking_server(tmp_path, capsys):
    from mmrepro.cli import main

    with mlflow_server(tmp_path / "server.db", tmp_path / "art") as uri:
        assert main(["init-tracking", "--results", str(tmp_path), "--uri", uri, "--out", str(tmp_path / "exp.json")]) == 0
        assert json.loads((tmp_path / "exp.json").read_text())["uri"] == uri
        run_jobs_at_once(uri, tmp_path)
        check_nothing_lost(uri, tmp_path)
    assert len(list((tmp_path / "art").rglob("metrics.json"))) == JOBS  # artifacts went through the server
    assert not (tmp_path / "mlflow.db").exists()  # nobody wrote the default store


def test_a_job_on_a_slurm_node_refuses_the_default_sqlite_store(tmp_path, monkeypatch, capsys):
    from mmrepro.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = json.dumps({**SPEC.to_dict(), "tracking_uri": None, "tracking_mode": "live", "results": str(tmp_path)})
    args = ["train", "--spec", spec, "--data", str(tmp_path / "no-store" / "manifest.json"), "--out-dir", str(tmp_path / "r")]
    assert main(args) == 2 and "manifest.json is missing" in capsys.readouterr().err  # off a cluster: on to the data
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "config key tracking.uri: this job runs on a SLURM node" in err and "MLFLOW_TRACKING_URI" in err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")  # a server named: the job goes on
    assert main(args) == 2 and "manifest.json is missing" in capsys.readouterr().err
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    deferred = ["train", "--spec", json.dumps({**json.loads(spec), "tracking_mode": "auto"}), *args[3:]]
    assert main(deferred) == 2 and "manifest.json is missing" in capsys.readouterr().err  # jobs leave the store alone
