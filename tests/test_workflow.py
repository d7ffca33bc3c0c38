"""End to end: the real Snakemake DAG on a tiny config in a temporary folder, checked from its files and MLflow."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from conftest import REPO

SNAKEFILE = REPO / "workflow" / "Snakefile"

TINY = {
    "results": "out",
    "seeds": [0, 1],
    "datasets": {"synth": {"loader": "synth", "synth": {"n": {"train": 160, "valid": 64, "test": 64}}}},
    "model": {"d_model": 8, "heads": 2},
    "train": {"epochs": 2, "batch_size": 32},
    "studies": {
        "balance": {"datasets": ["synth"], "methods": ["joint"],
                    "settings": {"complete": {"type": "complete"},
                                 "only_text": {"type": "subset", "modalities": ["text"], "methods": ["joint"]}}},
        "missing": {"datasets": ["synth"], "methods": ["joint"],
                    "settings": {"rate0.0": {"type": "zero_fill", "rate": 0.0},
                                 "rate0.5": {"type": "zero_fill", "rate": 0.5}}},
        "shift": {"datasets": ["synth"], "methods": ["source_only"],
                  "settings": {"source": {"type": "domain", "domain": "source"},
                               "target_all": {"type": "domain", "domain": "target_all"}}},
        "peft": {"datasets": ["synth"], "methods": ["full_finetune"], "settings": {"complete": {"type": "complete"}}},
    },
}


def snakemake(workdir: Path, *args: str, config: dict = TINY) -> subprocess.CompletedProcess:
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--directory", str(workdir),
                           "--configfile", str(workdir / "config.yaml"), "--cores", "2", *args],
                          capture_output=True, text=True, env=env, timeout=900)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("pipeline")
    done = snakemake(workdir)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (workdir / "terminal.txt").write_text(done.stdout + done.stderr)  # what the user saw
    return workdir / "out"


def test_every_table_and_plot_of_the_rules_is_marked_for_the_snakemake_report(tmp_path):
    """Per output stem under tables/ or plots/ (md, csv, tex, html, png, pdf of one table or plot),
    one file is marked report(...), so `snakemake --report` gathers it. The config plans every
    optional output: the missing study's three curves and CGGM's Figure 5."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, OutputSettings, Quietness, ResourceSettings, StorageSettings

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["method_variants"] = {"mplmm_l4": {"method": "mplmm", "params": {"prompt_length": 4}}}
    missing = config["studies"]["missing"]
    missing["methods"].append("mplmm_l4")
    missing["settings"]["rate0.3"] = {"type": "missing", "rate": 0.3}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
        workflow = api.workflow(resource_settings=ResourceSettings(cores=1), storage_settings=StorageSettings(),
                                config_settings=ConfigSettings(configfiles=[tmp_path / "config.yaml"]),
                                snakefile=SNAKEFILE, workdir=tmp_path)._workflow  # the parsed rules
        stems: dict[str, bool] = {}
        for rule in workflow.rules:
            for f in rule.output:
                path = Path(str(f))
                if {"tables", "plots"} & set(path.parts):
                    stem = str(path.with_suffix(""))
                    stems[stem] = stems.get(stem, False) or f.flags.get("report") is not None
    assert {"results/plots/missing_train_rates", "results/plots/missing_prompt_lengths",
            "results/plots/balance_cggm", "results/tables/missing_cases"} <= set(stems)
    assert [stem for stem, marked in stems.items() if not marked] == []


@pytest.mark.slow
def test_the_terminal_shows_where_to_look_at_the_runs_and_no_spec_json(pipeline):
    terminal = (pipeline.parent / "terminal.txt").read_text()
    assert "look at the runs: mlflow ui" in terminal and "#/experiments/" in terminal  # init_tracking's lines
    assert '"method_params"' not in terminal, "a job's spec JSON on the terminal"


@pytest.mark.slow
def test_every_study_ends_in_a_table_and_a_plot(pipeline):
    for study in TINY["studies"]:
        for ext in ("md", "csv", "tex"):
            assert (pipeline / "tables" / f"{study}.{ext}").stat().st_size > 0
        assert (pipeline / "plots" / f"{study}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (pipeline / "plots" / f"{study}.pdf").read_bytes()[:4] == b"%PDF"
        assert (pipeline / "plots" / f"{study}_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (pipeline / "tables" / "missing.md").read_text()
    assert "rate0.5" in table and "±" in table and "oracle" in table


@pytest.mark.slow
def test_snakemake_report_lists_every_table_and_plot(pipeline):
    done = snakemake(pipeline.parent, "--report", "report.html")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    html = (pipeline.parent / "report.html").read_text(encoding="utf-8", errors="replace")
    for study in TINY["studies"]:
        assert f"{study}.html" in html and f"{study}.png" in html and f"tables/paper/{study}.html" in html
        if study != "shift":
            assert f"{study}_curves.png" in html
    assert "sample standard deviation" in html  # the tables' caption


@pytest.mark.slow
def test_runs_write_their_files_with_honest_metrics(pipeline):
    runs = sorted([*pipeline.glob("*/synth/*/*/seed*/metrics.json"), *pipeline.glob("shift/synth/*/*/*/seed*/metrics.json")])
    assert len(runs) == 4 + 4 + 4 + 2  # balance, missing, shift (under its one backbone, late), peft
    assert len(list(pipeline.glob("shift/synth/late/source_only/*/seed*/metrics.json"))) == 4
    for path in runs:
        m = json.loads(path.read_text())
        assert m["seed"] in (0, 1) and m["label"] == "main" and m["task"] == "regression"
        test = m["metrics"]["test"]
        assert 0 <= test["acc2_has0"] <= 1 and test["mae"] > 0
        assert test["mae"] > m["oracle"]["test"]["mae"], path  # nothing beats the ceiling
    peft = json.loads(next(pipeline.glob("peft/synth/full_finetune/complete/seed0/metrics.json")).read_text())
    assert peft["trainable_params"] == peft["total_params"] > 0
    assert (pipeline / "backbones" / "peft" / "synth" / "seed0" / "model.pt").is_file()
    unimodal = json.loads((pipeline / "balance/synth/joint/only_text/seed0/metrics.json").read_text())
    joint = json.loads((pipeline / "balance/synth/joint/complete/seed0/metrics.json").read_text())
    assert 0 < unimodal["trainable_params"] < joint["trainable_params"]
    for study in ("balance", "missing", "peft"):
        assert not list((pipeline / study).rglob("last.ckpt")), "finished runs leave no resume checkpoint"


@pytest.mark.slow
def test_every_job_is_one_finished_mlflow_run_with_its_tags(pipeline):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{pipeline.resolve()}/mlflow.db")
    expected = {"balance": 4, "missing": 4, "shift": 4, "peft": 2, "backbones": 6}  # shift, peft, missing: 2 seeds each
    for name, count in expected.items():
        exp = client.get_experiment_by_name(name)
        assert exp.artifact_location.startswith((pipeline.resolve() / "mlartifacts").as_uri())
        runs = client.search_runs([exp.experiment_id])
        assert len(runs) == count, name
        for run in runs:
            assert run.info.status == "FINISHED"
            for tag in ("study", "dataset", "method", "setting", "seed", "git_commit", "config_hash",
                        "torch_version", "threads"):
                assert run.data.tags.get(tag), (name, tag)
            artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
            assert {"config.json", "metrics.json"} <= artifacts
    balance = client.search_runs([client.get_experiment_by_name("balance").experiment_id])[0]
    assert [m.step for m in client.get_metric_history(balance.info.run_id, "loss/valid_loss")] == [1, 2]


@pytest.mark.slow
def test_a_finished_pipeline_has_nothing_left_to_do(pipeline):
    again = snakemake(pipeline.parent, "-n")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr


@pytest.mark.slow
def test_jobs_read_their_spec_from_a_short_path_and_a_changed_spec_still_reruns_them(pipeline):
    """The command line names the spec's file (results/specs/<hash>.json), not 2 KB of JSON; the path
    carries the content's hash, so Snakemake's params trigger still reruns exactly the changed jobs."""
    log = snakemake(pipeline.parent, "-n", "-p", "--forceall")
    commands = [line for line in (log.stdout + log.stderr).splitlines() if "mmrepro train" in line or "mmrepro adapt" in line]
    assert commands and all("--spec out/specs/" in c and "{" not in c for c in commands), commands[:2]
    run = pipeline / "balance" / "synth" / "joint" / "complete" / "seed1"
    assert json.loads((run / "config.json").read_text()) in [json.loads(p.read_text()) for p in (pipeline / "specs").glob("*.json")]
    specs = sorted((pipeline / "specs").iterdir())
    changed = json.loads(json.dumps(TINY))
    changed["studies"]["missing"]["train"] = {"lr": 0.002}
    again = snakemake(pipeline.parent, "-n", config=changed)
    (pipeline.parent / "config.yaml").write_text(yaml.safe_dump(TINY))
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    rerun = re.findall(r"^rule (\w+):\n(?:.*\n)*?\s+output: (\S+)", out, flags=re.M)
    assert rerun and all("/missing/" in output for rule, output in rerun if rule in ("train", "backbone")), rerun
    assert "Params have changed since last execution" in out
    assert not [line for line in out.splitlines() if "output: out/balance/" in line], "an unchanged job was rerun"
    assert sorted((pipeline / "specs").iterdir()) == specs, "a dry run writes no spec file"


@pytest.mark.slow
def test_same_seed_gives_identical_metrics_json(pipeline, tmp_path):
    run = pipeline / "balance" / "synth" / "joint" / "complete" / "seed1"
    spec = (run / "config.json").read_text()
    out = tmp_path / "again"
    done = subprocess.run([sys.executable, "-m", "mmrepro.cli", "train", "--spec", spec, "--data",
                           str(pipeline / "data" / "synth" / "manifest.json"), "--out-dir", str(out), "--threads", "1"],
                          capture_output=True, text=True, cwd=pipeline.parent, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "metrics.json").read_bytes() == (run / "metrics.json").read_bytes()


@pytest.mark.parametrize("mutate, key", [
    (lambda c: c["studies"]["balance"].update(methods=["jiont"]), "studies.balance.methods[0]"),
    (lambda c: c["studies"]["balance"].update(datasets=["mosi"]), "studies.balance.datasets[0]"),
    (lambda c: c["studies"]["missing"]["settings"]["rate0.5"].update(rate=-0.5), "studies.missing.settings.rate0.5.rate"),
])
def test_bad_config_fails_before_any_job_naming_the_key(tmp_path, mutate, key):
    config = json.loads(json.dumps(TINY))
    mutate(config)
    done = snakemake(tmp_path, config=config)
    assert done.returncode != 0
    assert f"config key {key}" in done.stderr + done.stdout
    assert not (tmp_path / "out").exists(), "no job may start on a bad config"


def test_a_malformed_default_config_is_named_with_its_line_and_a_file_as_results_with_its_key(tmp_path):
    """Snakemake's own message names neither the file nor the line; the Snakefile reads it first."""
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text("results: out\nmethods:\n  cggm: {rho: 1.3\n")
    done = snakemake(tmp_path, "-n")
    assert done.returncode != 0
    assert "config file config/config.yaml, line 4, column 1: not valid YAML" in done.stderr + done.stdout
    (tmp_path / "config" / "config.yaml").write_text("{}")
    (tmp_path / "taken").write_text("a file")
    done = snakemake(tmp_path, "-n", config={**TINY, "results": "taken"})
    assert "config key results: taken is a file, not a folder" in done.stderr + done.stdout


@pytest.mark.parametrize("extra", [[], ["--configfile", "config/paper.yaml"]], ids=["default", "paper"])
def test_workflow_lints_clean(extra):
    """The paper config adds the per-dataset fetch rules, so it is linted too."""
    done = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--lint", *extra], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Congratulations" in done.stdout + done.stderr
