"""The shift study's backbone axis: config-time checks, the runs and paths it plans, its runs' identity
and the table's backbone column; and a search under a cross-dataset setting reading the target's store."""

from __future__ import annotations

import copy
import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, SCHEMA, default_config
from mmrepro.config import (ConfigError, backbone_runs, backbone_spec, load_schema, run_spec, study_grid,
                            validate_config)
from mmrepro.data import build_store
from mmrepro.jobs import adapt_job, train_job
from mmrepro.report import add_baseline_delta, load_histories, load_runs, summarize, write_table

AXIS = {"casp_late": {"backbone": "casp_late"}, "casp_early": {"backbone": "casp_early"}}


@functools.cache
def _default() -> dict:
    return default_config()


def _config(**shift) -> dict:
    """The default config, tiny, with the shift study's keys replaced by ``shift``."""
    config = copy.deepcopy(_default())
    config.update(seeds=[0], model={**config["model"], "d_model": 8, "heads": 2}, train={"epochs": 1, "batch_size": 32})
    config["datasets"]["synth"]["synth"]["n"] = {"train": 96, "valid": 32, "test": 32}
    config["methods"]["casp"] = {"epochs": 1, "snapshot_every": 1, "pl_epochs": 1, "batch_size": 16}
    config["studies"]["shift"].update({"model": {"backbone": "casp_late", "d_model": 8, "layers": 1, "heads": 2},
                                       "settings": {"target_all": {"type": "domain", "domain": "target_all"}},
                                       **shift})
    return config


def _validate(config: dict) -> dict:
    return validate_config(copy.deepcopy(config), load_schema(SCHEMA))


@pytest.mark.parametrize("shift, key, words", [
    ({"backbones": {"early": {"backbone": "casp_erly"}}}, "studies.shift.backbones.early.backbone", "unknown backbone"),
    ({"backbones": {"early": {"d_modl": 8}}}, "studies.shift.backbones.early", "d_modl"),
    ({"backbones": {"wide": {"heads": 3}}}, "studies.shift.backbones.wide", "must divide"),
    ({"backbones": {"bad/name": {}}}, "studies.shift.backbones", "does not match"),
    ({"backbones": AXIS, "source_model": {"study": "peft", "method": "full_finetune", "setting": "complete"}},
     "studies.shift.backbones", "source_model"),
    ({"methods": ["source_only", "ssa"], "source_model": {"study": "peft", "method": "full_finetune",
                                                          "setting": "complete"}},
     "studies.shift.methods[1]", "feature statistics"),
])
def test_a_backbone_axis_that_cannot_work_fails_at_config_time_naming_the_key(shift, key, words):
    with pytest.raises(ConfigError) as e:
        _validate(_config(**shift))
    assert f"config key {key}" in str(e.value), str(e.value)
    assert words in str(e.value)


def test_an_axis_outside_the_shift_study_is_refused():
    config = _config()
    config["studies"]["balance"]["backbones"] = AXIS
    with pytest.raises(ConfigError, match=r"^config key studies\.balance\.backbones: "):
        _validate(config)


def test_each_backbone_is_trained_once_per_seed_and_adapted_by_every_method():
    config = _validate(_config(backbones=AXIS))
    grid = study_grid(config, "shift")
    assert {(r["backbone"], r["method"]) for r in grid} == {(b, m) for b in AXIS for m in ("source_only", "casp")}
    assert backbone_runs(config, "shift") == [{"study": "shift", "dataset": "synth", "seed": 0, "backbone": b}
                                              for b in sorted(AXIS)]
    for name in AXIS:
        spec = run_spec(config, "shift", "synth", "casp", "target_all", 0, name)
        assert spec.backbone == name and spec.model.backbone == name and spec.model.d_model == 8
        assert backbone_spec(config, "shift", "synth", 0, name).model == spec.model
    with pytest.raises(ConfigError, match="no backbone None"):
        run_spec(config, "shift", "synth", "casp", "target_all", 0)  # two backbones: say which
    # other studies keep their grid and backbone jobs as they were
    assert all("backbone" not in r for r in study_grid(config, "peft"))
    assert backbone_runs(config, "peft") == [{"study": "peft", "dataset": "synth", "seed": 0}]


def test_without_an_axis_one_backbone_is_named_after_the_model_or_the_adapted_run():
    config = _validate(_config())
    assert {r["backbone"] for r in study_grid(config, "shift")} == {"casp_late"}
    assert run_spec(config, "shift", "synth", "casp", "target_all", 0).backbone == "casp_late"
    source = {"study": "peft", "method": "full_finetune", "setting": "complete"}
    config = _validate(_config(source_model=source))
    assert {r["backbone"] for r in study_grid(config, "shift")} == {"peft-full_finetune-complete"}
    assert backbone_runs(config, "shift") == [], "a study that adapts another study's runs trains no backbone"


def test_two_backbones_give_two_table_rows_per_method_with_their_own_source_only_delta(tmp_path):
    config = _validate(_config(backbones=AXIS))
    config["results"] = str(tmp_path)
    store = build_store("synth", config["datasets"]["synth"], tmp_path / "data" / "synth")
    paths = []
    for name in AXIS:
        folder = tmp_path / "backbones" / "shift" / "synth" / name / "seed0"
        trained = train_job(backbone_spec(config, "shift", "synth", 0, name), store, folder, threads=1)
        assert trained["backbone"] == name
        for method in ("source_only", "casp"):
            out = tmp_path / "shift" / "synth" / name / method / "target_all" / "seed0"
            summary = adapt_job(run_spec(config, "shift", "synth", method, "target_all", 0, name), store,
                                folder / "model.pt", out, threads=1, source_stats=folder / "feature_stats.pt")
            assert summary["backbone"] == name
            assert json.loads((out / "tracking.json").read_text())["tags"]["backbone"] == name
            paths.append(out / "metrics.json")
    runs = load_runs(paths)
    table = add_baseline_delta(summarize(runs), runs)
    assert list(zip(table["backbone"], table["method"])) == [(b, m) for b in AXIS for m in ("source_only", "casp")]
    assert table.loc[table["method"] == "source_only", "mae_delta"].abs().max() < 1e-12  # each its own baseline
    write_table(table, tmp_path / "shift")
    header = next(line for line in (tmp_path / "shift.md").read_text().splitlines() if line.startswith("|"))
    assert header.startswith("| backbone | method |")
    curves = load_histories(paths)
    assert set(curves["backbone"]) == set(AXIS)


def _plan(workdir: Path, config: dict, *targets: str) -> str:
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))  # keep the axis and setting order
    done = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile"),
                           "--directory", str(workdir), "--configfile", str(workdir / "config.yaml"), "-n", "-p",
                           "--cores", "1", *targets], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def test_the_dag_plans_each_backbone_and_a_cross_dataset_search_reads_the_target_store(tmp_path):
    """One dry run: two backbones per seed, every adapter on each; a search whose first setting is a
    cross-dataset one adapts the first backbone on the target's store (the source's before)."""
    config = _config(backbones=AXIS, tune=["source_only"],
                     settings={"to_other": {"type": "dataset", "target": "other"},
                               "target_all": {"type": "domain", "domain": "target_all"}})
    config["datasets"]["other"] = copy.deepcopy(config["datasets"]["synth"])
    config["datasets"]["other"]["synth"]["seed"] = 7
    config["tune"] = {"trials": 1, "space": {"source_only": {"train.batch_size": {"choices": [16, 32]}}}}
    out = _plan(tmp_path, config, "shift")
    for name in AXIS:
        assert f"backbones/shift/synth/{name}/seed0/model.pt" in out
        for method in ("source_only", "casp"):
            for setting in ("to_other", "target_all"):
                assert f"results/shift/synth/{name}/{method}/{setting}/seed0/metrics.json" in out
    assert "--data results/data/other/manifest.json --init results/backbones/shift/synth/casp_late/seed0/model.pt" \
        in out
