"""The typed run spec: the JSON a rule passes and a finished run keeps (config.json) loads, round-trips,
and a wrong key fails on loading with its name."""

from __future__ import annotations

import json
from dataclasses import FrozenInstanceError, replace
from pathlib import Path

import pytest

from conftest import balance_spec, default_config
from mmrepro.cli import main
from mmrepro.config import backbone_spec, mechanism_points, mechanism_spec, run_spec
from mmrepro.spec import MechanismSpec, RunSpec, SpecError

#: config.json files written before the spec was typed (when it was a dict): a shift run on the backbone
#: axis and a balance run, from the default DAG, and a UMT run with teachers (config/grids/balance_synth.yaml).
OLD = sorted((Path(__file__).parent / "data" / "run_config").glob("*.json"))


@pytest.mark.parametrize("path", OLD, ids=[p.stem for p in OLD])
def test_config_json_of_a_finished_run_loads_and_round_trips(path):
    text = path.read_text()
    spec = RunSpec.from_json(text)
    assert spec.to_dict() == json.loads(text)
    assert RunSpec.from_json(spec.to_json()) == spec


def test_old_files_hold_what_the_jobs_read():
    shift, cggm, umt = (RunSpec.from_json((OLD[0].parent / f"{name}.json").read_text())
                        for name in ("shift_casp", "balance_cggm", "balance_umt"))
    assert shift.backbone == "casp_late" and shift.plan.adapter == "casp" and shift.method_params["casp"]["epochs"] == 3
    assert cggm.backbone is None and cggm.utilisation_probes and cggm.train.lr == 0.001
    assert umt.teachers == {"text": "only_text", "audio": "only_audio", "vision": "only_vision"}


def test_specs_from_the_config_round_trip_through_json():
    config = default_config()
    for spec in (run_spec(config, "shift", "synth", "casp", "target_all", 1),
                 backbone_spec(config, "missing", "synth", 0), balance_spec()):
        assert RunSpec.from_json(spec.to_json()) == spec
    first = mechanism_points(config)[0]
    point = mechanism_spec(config, first["study"], float(first["dose"]), first["seed"])
    assert MechanismSpec.from_json(point.to_json()) == point


def test_keys_added_later_are_left_out_of_the_json_at_their_defaults():
    """train.shuffle, train.selection, train.max_steps, tuned_on_target_labels and stand_in: at their
    defaults the spec's JSON (what Snakemake compares to decide a re-run, and config.json) is what it was
    before they existed; set, they are typed and round-trip."""
    spec = balance_spec()
    data = spec.to_dict()
    assert not {"shuffle", "selection", "max_steps"} & set(data["train"])
    assert not {"tuned_on_target_labels", "stand_in"} & set(data)
    changed = replace(spec, train=replace(spec.train, shuffle=False, selection="valid_accuracy", max_steps=2),
                      tuned_on_target_labels=True, stand_in="tiny")
    data = changed.to_dict()
    assert (data["train"]["shuffle"], data["train"]["selection"], data["train"]["max_steps"]) == \
        (False, "valid_accuracy", 2)
    assert (data["tuned_on_target_labels"], data["stand_in"]) == (True, "tiny")
    assert RunSpec.from_json(changed.to_json()) == changed
    with pytest.raises(SpecError, match="spec key train.max_steps: expected"):
        RunSpec.from_dict({**data, "train": {**data["train"], "max_steps": "2"}})


@pytest.mark.parametrize("change, key", [
    (lambda d: d["train"].update(lr="fast"), "spec key train.lr: expected float"),
    (lambda d: d["train"].update(batch_sise=8), "spec key train.batch_sise: unknown"),
    (lambda d: d.pop("seed"), "spec key seed: missing"),
    (lambda d: d.update(seed=True), "spec key seed: expected int"),
    (lambda d: d["plan"].update(hook=None), "spec key plan.hook: expected str"),
    (lambda d: d["method_params"].pop("joint"), "spec key method_params: no entry for plug-in 'joint'"),
])
def test_a_wrong_key_fails_on_loading_naming_it(change, key):
    data = balance_spec().to_dict()
    change(data)
    with pytest.raises(SpecError, match=key):
        RunSpec.from_dict(data)


def test_the_cli_refuses_a_bad_spec_naming_the_key(tmp_path, capsys):
    data = {**balance_spec().to_dict(), "utilisation_probe": True}
    with pytest.raises(SystemExit):
        main(["train", "--spec", json.dumps(data), "--data", "x", "--out-dir", str(tmp_path)])
    assert "argument --spec: spec key utilisation_probe: unknown" in capsys.readouterr().err


def test_a_spec_is_frozen_and_search_parameters_make_a_new_one():
    spec = balance_spec()
    with pytest.raises(FrozenInstanceError):
        spec.seed = 1
    tuned = spec.with_params({"train.lr": 0.01, "model.dropout": 0.3, "methods.joint.x": 1})
    assert (tuned.train.lr, tuned.model.dropout, tuned.method_params["joint"]) == (0.01, 0.3, {"x": 1})
    assert (spec.train.lr, spec.model.dropout, spec.method_params["joint"]) == (0.001, 0.1, {})
    with pytest.raises(KeyError, match="methods.cggm.rho"):
        spec.with_params({"methods.cggm.rho": 1.0})  # not a plug-in of this run
