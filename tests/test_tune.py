"""Optuna searches: config checks, the shared trial budget, a killed worker resuming, pruning from
the training loop, the adapt and fine-tune kinds, and a real search -> final run -> report DAG."""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from optuna.trial import TrialState

from conftest import REPO, SCHEMA
from mmrepro import tune
from mmrepro.config import EXPERIMENTS, ConfigError, load_schema, search_spec, tuned_methods, validate_config
from mmrepro.data import build_store
from mmrepro.jobs import train_job
from mmrepro.spec import RunSpec
from mmrepro.tracking import init_store

TINY = {
    "results": "out",
    "seeds": [0],
    "datasets": {"synth": {"loader": "synth", "synth": {"n": {"train": 160, "valid": 64, "test": 64}}}},
    "model": {"d_model": 8, "heads": 2},
    "train": {"epochs": 2, "batch_size": 32, "lr": 0.003},
    "tune": {"trials": 3, "sampler": {"n_startup_trials": 2},
             "space": {"cggm": {"train.lr": {"low": 0.0001, "high": 0.01, "log": True},
                                "methods.cggm.rho": {"low": 0.5, "high": 2.0}},
                       "lora": {"train.lr": {"low": 0.0001, "high": 0.01, "log": True},
                                "methods.lora.r": {"low": 2, "high": 8, "type": "int"}},
                       "source_only": {"train.batch_size": {"choices": [16, 32]}}}},
    "studies": {
        "balance": {"datasets": ["synth"], "methods": ["cggm"], "settings": {"complete": {"type": "complete"}},
                    "tune": ["cggm"]},
        "shift": {"datasets": ["synth"], "methods": ["source_only"],
                  "settings": {"source": {"type": "domain", "domain": "source"}}, "tune": True},
        "peft": {"datasets": ["synth"], "methods": ["lora"], "settings": {"complete": {"type": "complete"}},
                 "tune": ["lora"]},
    },
}


def tiny_config(results: Path | None = None, **tune_keys) -> dict:
    config = copy.deepcopy(TINY)
    config["tune"].update(tune_keys)
    if results is not None:
        config["results"] = str(results)
    return validate_config(config, load_schema(SCHEMA))


def _study(search: dict, workdir: Path = Path.cwd()) -> optuna.Study:
    """The search's study; a journal path is relative to the directory Snakemake ran in."""
    return optuna.load_study(study_name=search["name"], storage=tune._storage(str(workdir / search["storage"])))


def _states(study: optuna.Study) -> list[str]:
    return [t.state.name for t in study.get_trials()]


# --- config ---------------------------------------------------------------------------------------

def test_default_config_tunes_nothing():
    config = validate_config(yaml.safe_load((REPO / "config" / "config.yaml").read_text()), load_schema(SCHEMA))
    assert all(tuned_methods(config, study) == [] for study in config["studies"])


@pytest.mark.parametrize("mutate, key", [
    (lambda c: c["tune"]["space"]["cggm"].update({"train.lrr": {"low": 0.1, "high": 1.0}}), "tune.space.cggm.train.lrr"),
    (lambda c: c["tune"]["space"]["cggm"].update({"methods.lora.r": {"low": 1, "high": 9}}),
     "tune.space.cggm.methods.lora.r"),
    (lambda c: c["tune"]["space"]["cggm"]["methods.cggm.rho"].update(low=1.5), "tune.space.cggm.methods.cggm.rho"),
    (lambda c: c["tune"]["space"].pop("lora"), "tune.space.lora"),
    (lambda c: c["studies"]["balance"].update(tune=["joint"]), "studies.balance.tune[0]"),
])
def test_bad_tune_config_names_the_key(mutate, key):
    config = copy.deepcopy(TINY)
    mutate(config)
    with pytest.raises(ConfigError, match=re.escape(f"config key {key}:")):
        validate_config(config, load_schema(SCHEMA))


def test_default_point_is_the_configs_values_else_the_plugins():
    search = search_spec(tiny_config(), "balance", "synth", "cggm")
    assert search["default"] == {"train.lr": 0.003, "methods.cggm.rho": 1.3}  # rho: CGGM's own default
    assert search["spec"]["setting"] == "complete" and search["spec"]["seed"] == 0
    spec = RunSpec.from_dict(search["spec"])
    tuned = spec.with_params({"train.lr": 0.01, "methods.cggm.rho": 0.7})
    assert tuned.train.lr == 0.01 and tuned.method_params["cggm"]["rho"] == 0.7
    assert spec.train.lr == 0.003 and "rho" not in spec.method_params["cggm"], "the searched spec is not modified"
    with pytest.raises(KeyError, match="train.lrr"):
        spec.with_params({"train.lrr": 0.1})


# --- searches in process and in worker processes ---------------------------------------------------

@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """A results folder with a tiny synth store, the MLflow store and the shift/peft backbones."""
    out = tmp_path_factory.mktemp("tune") / "out"
    config = tiny_config(out)
    build_store("synth", config["datasets"]["synth"], out / "data" / "synth")
    init_store(f"sqlite:///{out.resolve()}/mlflow.db", EXPERIMENTS, out / "mlartifacts")
    from mmrepro.config import backbone_spec

    for study in ("shift", "peft"):
        spec = backbone_spec(config, study, "synth", 0)
        train_job(spec, out / "data" / "synth" / "manifest.json", out / "backbones" / study, threads=1)
    return out


def _create(results: Path, study: str, method: str, **tune_keys) -> dict:
    search = search_spec(tiny_config(results, **tune_keys), study, "synth", method)
    Path(search["storage"]).unlink(missing_ok=True)  # a fresh study per test
    return tune.create(search)


def _work_cmd(search_file: Path, results: Path, worker: int, init: Path | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "mmrepro.cli", "tune", "work", "--search-file", str(search_file),
           "--data", str(results / "data" / "synth" / "manifest.json"), "--worker", str(worker),
           "--out", str(search_file.parent / f"worker{worker}.json")]
    return cmd + (["--init", str(init)] if init else [])


def test_a_killed_worker_resumes_to_exactly_the_budget(results, tmp_path):
    search = _create(results, "balance", "cggm", trials=3)
    search_file = tmp_path / "search.json"
    slow = copy.deepcopy(search)  # long enough trials to be caught running
    slow["spec"]["train"].update(epochs=40, patience=40)
    search_file.write_text(json.dumps(slow))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_work_cmd(search_file, results, 0), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    study = _study(search)
    try:
        deadline = time.monotonic() + 600
        # Kill once the running trial has its parameters (see the next test for a kill before that).
        while not any(t.params for t in study.get_trials(states=(TrialState.RUNNING,))) and time.monotonic() < deadline:
            assert proc.poll() is None, "the worker ended before any trial ran"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed = [t for t in study.get_trials() if t.state == TrialState.RUNNING]
    assert len(killed) == 1, _states(study)

    summary = tune.work(search, 0, results / "data" / "synth" / "manifest.json", None, threads=1)
    trials = _study(search).get_trials()
    assert summary["retried"] == [killed[0].number]
    assert trials[killed[0].number].state == TrialState.FAIL
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3
    assert not any(t.state == TrialState.RUNNING for t in trials)
    retry = [t for t in trials if t.user_attrs.get("retry_of") == killed[0].number]
    assert len(retry) == 1 and retry[0].params == killed[0].params and retry[0].state == TrialState.COMPLETE
    assert trials[0].params == search["default"], "the config's values are the first trial"
    again = tune.work(search, 0, results / "data" / "synth" / "manifest.json", None, threads=1)
    assert again["ran"] == 0 and again["states"] == summary["states"], "a finished budget runs nothing more"


def test_a_trial_killed_before_suggesting_is_retried_at_its_enqueued_point(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}")
    study.enqueue_trial({"train.lr": 0.003})
    study.ask()  # claimed by a job that died before its objective suggested anything
    assert tune._fail_stale(study, None) == [0]
    retry = study.ask()
    assert retry.params == {} and retry.suggest_float("train.lr", 1e-4, 1e-2) == 0.003
    assert retry.user_attrs["retry_of"] == 0


def test_pruning_stops_a_bad_trial_from_the_loops_validation_loss(results, tmp_path):
    search = _create(results, "balance", "cggm", trials=2,
                     pruner={"type": "median", "n_startup_trials": 1, "n_warmup_steps": 0, "interval_steps": 1})
    search["spec"]["train"].update(epochs=3, patience=3)
    search["space"]["train.lr"]["low"] = 1e-9  # lets the enqueued trial learn next to nothing
    _study(search).enqueue_trial({"train.lr": 1e-9, "methods.cggm.rho": 1.3})
    tune.work(search, 0, results / "data" / "synth" / "manifest.json", None, threads=1)
    trials = _study(search).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED], _states(_study(search))
    assert len(trials[1].intermediate_values) < 3, "pruned before its last epoch"
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{results.resolve()}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("balance").experiment_id],
                              f"tags.search = '{search['name']}' and tags.role = 'trial'")
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED"]
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {search["parent_run"]}


@pytest.mark.parametrize("study, method, init", [("peft", "lora", "peft"), ("shift", "source_only", "shift")])
def test_fine_tune_and_adapt_searches_write_their_best(results, tmp_path, study, method, init):
    search = _create(results, study, method, trials=2)
    model = results / "backbones" / init / "model.pt"
    manifest = results / "data" / "synth" / "manifest.json"
    best = tune.best(search, manifest, model, threads=1, folder=tmp_path)
    assert best["states"] == {"COMPLETE": 2} and set(best["params"]) == set(search["space"])
    for name in ("history.png", "importances.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    parent = mlflow.MlflowClient(tracking_uri=f"sqlite:///{results.resolve()}/mlflow.db").get_run(search["parent_run"])
    assert parent.info.status == "FINISHED"
    assert {k: v for k, v in parent.data.params.items() if k.startswith("best.")} == \
        {f"best.{k}": str(v) for k, v in best["params"].items()}
    # scored on the source's validation split (complete / a synth domain setting): no target labels
    assert best["target_labels_used"] is False and parent.data.tags["target_labels_used"] == "false"


def test_a_search_scored_on_a_targets_labels_marks_itself_and_every_run_it_tunes(results, tmp_path):
    """A cross-dataset setting validates on the target's labels: the search says so (best.json, its MLflow
    run), and a final run that takes its parameters says so in metrics.json, the MLflow tags and the table."""
    from mmrepro.cli import main
    from mmrepro.report import load_runs
    from mmrepro.tracking import ingest_runs

    config = copy.deepcopy(TINY)
    config["results"] = str(results)
    config["studies"]["shift"]["settings"] = {"to_synth": {"type": "dataset", "target": "synth"}}
    search = search_spec(validate_config(config, load_schema(SCHEMA)), "shift", "synth", "source_only")
    Path(search["storage"]).unlink(missing_ok=True)
    search = tune.create({**search, "trials": 2})
    manifest, model = results / "data" / "synth" / "manifest.json", results / "backbones" / "shift" / "model.pt"
    best = tune.best(search, manifest, model, threads=1, folder=tmp_path)
    assert best["target_labels_used"] is True and best["setting"] == "to_synth"
    uri = f"sqlite:///{results.resolve()}/mlflow.db"
    assert mlflow.MlflowClient(uri).get_run(search["parent_run"]).data.tags["target_labels_used"] == "true"

    (tmp_path / "best.json").write_text(json.dumps(best))
    out = tmp_path / "run"
    args = ["adapt", "--spec", json.dumps(search["spec"]), "--data", str(manifest), "--model", str(model),
            "--out-dir", str(out), "--tuned", str(tmp_path / "best.json")]
    assert main(args) == 0
    assert json.loads((out / "metrics.json").read_text())["target_labels_used"] is True
    assert json.loads((out / "config.json").read_text())["tuned_on_target_labels"] is True
    run_id = ingest_runs(uri, [out])[out.as_posix()]
    assert mlflow.MlflowClient(uri).get_run(run_id).data.tags["target_labels_used"] == "true"
    assert set(load_runs([out / "metrics.json"])["method"]) == {"source_only [target labels]"}

    (tmp_path / "best.json").write_text(json.dumps({k: v for k, v in best.items() if k != "target_labels_used"}))
    with pytest.raises(SystemExit, match="delete it and run the search's tune_best job again"):
        main(args)


# --- through Snakemake: search -> final run -> report, two workers on one study ------------------------

@pytest.mark.slow
def test_a_search_feeds_the_final_run_through_the_dag(tmp_path):
    config = copy.deepcopy(TINY)
    config["tune"]["workers"] = 2
    config["train"]["lr"] = 0.0001  # a default point that barely learns in 2 epochs: a sampled one wins
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile"), "--directory", str(tmp_path),
           "--configfile", str(tmp_path / "config.yaml"), "--cores", "2", "balance"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "out"
    folder = out / "tune" / "balance" / "synth" / "cggm"
    best = json.loads((folder / "best.json").read_text())
    search = json.loads((folder / "search.json").read_text())
    trials = _study(search, tmp_path).get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 3 and best["states"]["COMPLETE"] == 3
    assert len({tuple(sorted(t.params.items())) for t in complete}) == 3, "no point evaluated twice"
    workers = [json.loads((folder / f"worker{i}.json").read_text()) for i in range(2)]
    assert sum(w["ran"] for w in workers) == 3
    final = json.loads((out / "balance" / "synth" / "cggm" / "complete" / "seed0" / "config.json").read_text())
    assert final["train"]["lr"] == best["params"]["train.lr"]
    assert final["method_params"]["cggm"]["rho"] == best["params"]["methods.cggm.rho"]
    assert "cggm" in (out / "tables" / "balance.md").read_text()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out.resolve()}/mlflow.db")
    exp = client.get_experiment_by_name("balance").experiment_id
    nested = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{search['parent_run']}'")
    assert len(nested) == 3 and all(r.info.status == "FINISHED" for r in nested)
    again = subprocess.run([*cmd, "-n"], capture_output=True, text=True, env=env, timeout=600)
    assert "Nothing to be done" in again.stdout + again.stderr


@pytest.mark.slow
def test_the_readme_grid_plans_a_search_before_the_final_runs_of_each_study(tmp_path):
    """config/grids/tune_synth.yaml (docs/tuning.md's command): one search per study, two workers each,
    each feeding its method's final runs; without it the DAG has no tune job."""
    def plan(*configs: str) -> str:
        files = [str(REPO / "config" / "config.yaml"), *(str(REPO / c) for c in configs)]
        done = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile"),
                               "--directory", str(tmp_path), "--configfile", *files, "-n", "-p", "--cores", "1"],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout + done.stderr

    tuned = plan("config/grids/tune_synth.yaml")
    for rule, count in (("tune_create", 4), ("tune_worker", 8), ("tune_best", 4)):
        assert re.search(rf"^{rule}\s+{count}$", tuned, re.M), rule
    for study, method in (("balance", "cggm"), ("missing", "modality_dropout"), ("shift", "source_only"),
                          ("peft", "lora")):
        assert f"--tuned results/tune/{study}/synth/{method}/best.json" in tuned, study
    assert "--tuned results/tune/peft/synth/full_finetune" not in tuned, "untuned methods keep the config's values"
    untuned = plan()
    assert "tune_" not in untuned and "--tuned" not in untuned
