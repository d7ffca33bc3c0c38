"""MLflow tracking: the store is created once, runs carry their tags, metrics steps and artifacts."""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from conftest import balance_spec
from mmrepro.cli import main
from mmrepro.phases import Phases
from mmrepro.spec import TrackingSpec
from mmrepro.tracking import (COMPARE_VIEW, EXPERIMENT_KIND, SHARED_VIEW_PREFIX, DeferredRun, RunTracker, flatten,
                              history_steps, ingest_runs, init_store, log_outcome, open_run, record, tracking_mode,
                              tracking_uri)

SPEC = balance_spec(seed=3)
SUMMARY = {"task": "regression", "backbone": "late", "best_epoch": 2, "trainable_params": 10, "backbone_params": 40,
           "metrics": {"test": {"mae": 0.5, "corr": float("nan")}, "valid": {"mae": 0.4}},
           "oracle": {"test": {"mae": 0.2}}}


def test_mlflow_telemetry_is_off_unless_the_user_turns_it_on():
    """Its thread's failed config request on an offline node deletes an environment variable under a job's
    first tracking call (a KeyError that failed a SLURM job); the package turns it off before mlflow loads."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_DISABLE_TELEMETRY"}
    check = [sys.executable, "-c", "import os, mmrepro; print(os.environ['MLFLOW_DISABLE_TELEMETRY'])"]
    assert subprocess.run(check, env=env, capture_output=True, text=True, check=True).stdout.strip() == "true"
    kept = subprocess.run(check, env={**env, "MLFLOW_DISABLE_TELEMETRY": "false"}, capture_output=True, text=True,
                          check=True)
    assert kept.stdout.strip() == "false"


def test_default_uri_is_sqlite_under_results_and_env_overrides(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert tracking_uri(tmp_path, "http://server:5000") == "http://server:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://elsewhere:5000")
    assert tracking_uri(tmp_path, "http://server:5000") == "http://elsewhere:5000"


def test_flatten_params():
    assert flatten({"train": {"lr": 0.1, "e": {}}, "m": [1, 2]}) == {"train.lr": "0.1", "train.e": "{}", "m": "[1, 2]"}


def _log_one_run(uri, tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"mae": 0.5}))
    with RunTracker(uri, "balance", SPEC, threads=2) as run:
        run.log_metrics({"train_loss": 1.0}, step=1)
        run.log_metrics({"train_loss": 0.5}, step=2)
        run.log_summary(SUMMARY)
        run.log_artifact(tmp_path / "metrics.json")
    return run.run_id


def _check_run(uri, run_id):
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key, value in {"study": "balance", "dataset": "synth", "method": "joint", "setting": "complete",
                       "seed": "3", "threads": "2"}.items():
        assert run.data.tags[key] == value
    for key in ("git_commit", "config_hash", "torch_version"):
        assert run.data.tags[key]
    assert run.data.params["train.lr"] == "0.001"
    assert run.info.run_name == "joint/complete/seed3"  # what differs inside a study, not a path
    metrics = dict(run.data.metrics)
    assert math.isnan(metrics.pop("test/corr"))  # a NaN metric is logged as NaN, as metrics.json has it
    assert metrics == {"loss/train_loss": 0.5, "test/mae": 0.5, "valid/mae": 0.4, "oracle/test/mae": 0.2,
                       "params/trainable": 10, "params/backbone": 40}
    assert (run.data.tags["task"], run.data.tags["backbone"]) == ("regression", "late")
    history = client.get_metric_history(run_id, "loss/train_loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5)]
    assert [a.path for a in client.list_artifacts(run_id)] == ["metrics.json"]


def test_init_then_log_a_run_to_sqlite(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    ids = init_store(uri, ["balance", "shift"], tmp_path / "artifacts")
    assert init_store(uri, ["balance", "shift"], tmp_path / "artifacts") == ids  # idempotent
    exp = mlflow.MlflowClient(tracking_uri=uri).get_experiment(ids["balance"])
    assert exp.artifact_location == (tmp_path / "artifacts" / "balance").resolve().as_uri()
    _check_run(uri, _log_one_run(uri, tmp_path))
    assert (tmp_path / "artifacts" / "balance").is_dir()


def test_experiments_open_on_training_runs_with_a_comparison_view(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri)
    client.create_experiment("shift", artifact_location=(tmp_path / "a").as_uri())  # made before: gets the tags too
    ids = init_store(uri, ["balance", "shift"], tmp_path / "artifacts")
    for exp_id in ids.values():
        tags = client.get_experiment(exp_id).tags
        assert tags[EXPERIMENT_KIND[0]] == EXPERIMENT_KIND[1] == "custom_model_development"
        view = json.loads(tags[SHARED_VIEW_PREFIX + COMPARE_VIEW])
        assert {"tags.`method`", "tags.`setting`", "tags.`seed`", "metrics.`test/mae`"} <= set(view["selectedColumns"])


def test_a_failing_job_marks_its_run_failed(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    init_store(uri, ["balance"], tmp_path / "artifacts")
    with pytest.raises(RuntimeError):
        with RunTracker(uri, "balance", SPEC, threads=1, run_name="boom") as run:
            raise RuntimeError("boom")
    assert mlflow.MlflowClient(tracking_uri=uri).get_run(run.run_id).info.status == "FAILED"


def test_jobs_never_create_experiments(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    init_store(uri, ["balance"], tmp_path / "artifacts")
    with pytest.raises(RuntimeError, match="init_tracking"):
        with RunTracker(uri, "peft", SPEC, threads=1, run_name="x"):
            pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(args: list[str], port: int) -> subprocess.Popen:
    """Start ``mlflow <args>`` on loopback and wait for it (slow to start on a loaded machine)."""
    server = subprocess.Popen([sys.executable, "-m", "mlflow", *args, "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return server
        except OSError:
            if server.poll() is not None:
                pytest.fail(f"mlflow {args[0]} exited with {server.returncode}")
            time.sleep(0.5)
    server.terminate()
    pytest.fail("MLflow did not come up in 5 minutes")


def _stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:  # a loaded machine can take longer to shut uvicorn down
        server.kill()
        server.wait(timeout=60)


def test_a_tracking_server_works_too(tmp_path):
    """Start a real MLflow server on loopback and log through it, as a cluster user would."""
    port = _free_port()
    server = _serve(["server", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
                     "--artifacts-destination", str(tmp_path / "art")], port)
    uri = f"http://127.0.0.1:{port}"
    try:
        init_store(uri, ["balance"], tmp_path / "unused")
        _check_run(uri, _log_one_run(uri, tmp_path))
        assert list((tmp_path / "art").rglob("metrics.json"))
    finally:
        _stop(server)


def test_mode_auto_is_live_for_a_server_and_deferred_for_a_local_store():
    assert tracking_mode("sqlite:////tmp/x/mlflow.db") == "deferred"
    assert tracking_mode("http://127.0.0.1:5000") == "live"
    assert tracking_mode("sqlite:////tmp/x/mlflow.db", "live") == "live"
    assert tracking_mode("http://127.0.0.1:5000", "deferred") == "deferred"
    with pytest.raises(ValueError, match="tracking.mode"):
        tracking_mode("sqlite:///x.db", "sometimes")


def _finished_run_folder(folder, spec, mode):
    """What a job leaves behind: its files, then tracking.json from the run it logged to."""
    folder.mkdir(parents=True)
    history = [{"epoch": 1, "train_loss": 1.0, "valid_loss": 0.9}, {"epoch": 2, "train_loss": 0.5, "valid_loss": 0.7}]
    summary = {"metrics": {"test": {"mae": 0.6}}, "oracle": {"test": {"mae": 0.2}}, "best_epoch": 2, "task": "regression",
               "backbone": "late"}
    (folder / "config.json").write_text(spec.to_json())
    (folder / "history.json").write_text(json.dumps(history))
    with open_run(spec, threads=2) as run:
        assert isinstance(run, DeferredRun if mode == "deferred" else RunTracker)
        for step, values in history_steps(history):
            run.log_metrics(values, step)
        (folder / "metrics.json").write_text(json.dumps(summary))
        log_outcome(run, folder, summary)
        record(run, folder, tracking_uri(spec.results, spec.tracking.uri))


@pytest.mark.parametrize("mode", ["deferred", "live"])
def test_deferred_and_live_runs_end_as_the_same_mlflow_record(tmp_path, monkeypatch, mode):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking_uri(tmp_path)
    init_store(uri, ["balance"], tmp_path / "artifacts")
    spec = replace(SPEC, results=str(tmp_path), tracking=TrackingSpec(uri=None, mode=mode))
    folder = tmp_path / "balance" / "run"
    _finished_run_folder(folder, spec, mode)
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("balance").experiment_id
    assert len(client.search_runs([exp])) == (0 if mode == "deferred" else 1)

    ids = ingest_runs(uri, [folder])
    assert ingest_runs(uri, [folder]) == ids, "ingesting twice must not log the run twice"
    runs = client.search_runs([exp])
    assert [r.info.run_id for r in runs] == [ids[folder.as_posix()]]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["threads"] == "2" and run.data.tags["seed"] == "3"
    assert run.data.params["train.lr"] == "0.001"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss/valid_loss")] == [(1, 0.9), (2, 0.7)]
    assert run.data.metrics["test/mae"] == 0.6 and run.data.tags["backbone"] == "late"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"config.json", "metrics.json", "history.json"}


def _chart_sections(metric_keys) -> list[str]:
    """The sections of a run's charts in the order MLflow 3.17's run page shows them: named by the
    key's part before the last ``/``, sorted, keys without one ("Model metrics", "") last."""
    named = sorted({k.rsplit("/", 1)[0] for k in metric_keys if "/" in k})
    return named + ([""] if any("/" not in k for k in metric_keys) else [])


def test_a_run_page_opens_on_its_loss_curves(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    init_store(uri, ["balance"], tmp_path / "artifacts")
    with RunTracker(uri, "balance", SPEC, threads=1) as run:
        for epoch in (1, 2):
            run.log_metrics({"train_loss": 1.0 / epoch, "valid_loss": 1.2 / epoch, "util_text": 0.5, "coeff_audio": 1.0,
                             "lr": 0.001}, step=epoch)
        run.log_summary(SUMMARY)
    metrics = mlflow.MlflowClient(tracking_uri=uri).get_run(run.run_id).data.metrics
    sections = _chart_sections(metrics)
    assert sections[:2] == ["loss", "monitor"], sections  # then oracle/test, params, test, valid
    assert {k for k in metrics if k.startswith("loss/")} == {"loss/train_loss", "loss/valid_loss"}
    assert metrics["test/mae"] == 0.5 and metrics["monitor/util_text"] == 0.5  # final metrics keep their names


def test_a_deferred_run_lasts_as_long_as_its_job(tmp_path, monkeypatch):
    """Run Duration in the UI is the job's wall-clock time (timings.json), not the seconds of logging it later."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking_uri(tmp_path)
    init_store(uri, ["balance"], tmp_path / "artifacts")
    folder = tmp_path / "balance" / "run"
    phases = Phases()
    _finished_run_folder(folder, replace(SPEC, results=str(tmp_path), tracking=TrackingSpec(uri=None, mode="deferred")),
                         "deferred")
    phases.lap("train")
    timings = phases.summary()
    (folder / "timings.json").write_text(json.dumps(timings))
    run_id = ingest_runs(uri, [folder])[folder.as_posix()]
    info = mlflow.MlflowClient(tracking_uri=uri).get_run(run_id).info
    assert (info.start_time, info.end_time) == (int(timings["start"] * 1000), int(timings["end"] * 1000))
    assert info.end_time - info.start_time >= (timings["total"] - 0.01) * 1000  # the job, from its process's start


def test_a_moved_results_folder_stays_one_set_of_runs(tmp_path, monkeypatch):
    """Copy a results folder elsewhere, remove the original, run the tracking step there: the same
    runs (none logged again), their artifacts read from the new place, new runs' artifacts written there."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    monkeypatch.chdir(old)  # as Snakemake runs the rules: paths relative to the working directory
    assert main(["init-tracking", "--results", "results", "--out", "results/tracking/experiments.json"]) == 0
    spec = replace(SPEC, results="results", tracking=TrackingSpec(uri=None, mode="deferred"))
    for seed in (0, 1):
        _finished_run_folder(Path(f"results/balance/seed{seed}"), replace(spec, seed=seed), "deferred")
    track = ["track", "--results", "results", "--out", "results/tracking/balance.json",
             "results/balance/seed0/metrics.json", "results/balance/seed1/metrics.json"]
    assert main(track) == 0
    before = json.loads(Path("results/tracking/balance.json").read_text())["runs"]
    own = (tmp_path / "own" / "mine").as_uri()  # a user's experiment elsewhere: not the pipeline's to move
    mlflow.MlflowClient(tracking_uri=tracking_uri(old / "results")).create_experiment("mine", artifact_location=own)

    shutil.copytree(old, new)
    shutil.rmtree(old)
    monkeypatch.chdir(new)
    _finished_run_folder(Path("results/balance/seed2"), replace(spec, seed=2), "deferred")
    assert main([*track, "results/balance/seed2/metrics.json"]) == 0
    after = json.loads(Path("results/tracking/balance.json").read_text())["runs"]
    assert {k: after[k] for k in before} == before, "runs of the moved folder were logged again"

    uri = tracking_uri(new / "results")
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("balance")
    assert exp.artifact_location == (new / "results" / "mlartifacts" / "balance").resolve().as_uri()
    assert client.get_experiment_by_name("mine").artifact_location == own
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted(after.values())  # 3 runs for 3 jobs
    for run in runs:
        assert run.info.artifact_uri.startswith(exp.artifact_location)
        got = client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path / run.info.run_id))
        assert json.loads(Path(got).read_text())["metrics"]["test"]["mae"] == 0.6
