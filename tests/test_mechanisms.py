"""Dose knobs and diagnostics on synth: each phenomenon is there at its setting's dose and gone at dose zero."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from conftest import SCHEMA, default_config, small_synth
from mmrepro import mechanisms
from mmrepro.config import ConfigError, load_schema, validate_config
from mmrepro.data import build_store, synth
from mmrepro.report.mechanisms import diagnostics_table, load_points, plot_mechanism


def _store(tmp_path, name, train=800, **synth_keys):
    ds = small_synth(train=train, valid=300, test=300)
    ds["synth"].update(domains={}, **synth_keys)
    return build_store("synth", ds, tmp_path / name)


def test_imbalance_is_present_at_the_settings_dose_and_absent_at_zero(tmp_path):
    """Weak encoders under joint training vs alone, 6 epochs each (measured on a loaded CPU:
    dose 1.0 gaps audio 0.066, vision 0.070; dose 0 gaps audio -0.053, vision 0.013; threshold 0.05)."""
    dose = default_config()["datasets"]["synth_imbalance"]["synth"]["shortcut_private"]
    budget = mechanisms.Budget()
    valid = mechanisms.measure_imbalance(_store(tmp_path, "dosed", shortcut_private=dose), "main", budget, 0, dose)
    zero = mechanisms.measure_imbalance(_store(tmp_path, "zero", shortcut_private=0.0), "main", budget, 0, 0.0)
    assert valid.present, valid
    assert not zero.present, zero
    assert valid.value > zero.value + 0.05, (valid, zero)


def test_the_imbalance_dose_changes_only_the_shortcut():
    cfg = small_synth(train=300, valid=20, test=20)["synth"]
    base = synth.SynthGenerator(cfg).split("train", 300)
    dosed = synth.SynthGenerator({**cfg, "shortcut_private": 1.0}).split("train", 300)
    for key in base[0]:
        if key == "x/text":
            assert not np.allclose(base[0][key], dosed[0][key])
        elif key != "ids":
            np.testing.assert_array_equal(base[0][key], dosed[0][key])
    with pytest.raises(ValueError, match="shortcut_private"):
        synth.SynthGenerator({**cfg, "shortcut_private": 1.5})


def test_the_shortcut_ceiling_rises_with_the_imbalance_dose(tmp_path):
    from mmrepro.data.store import FeatureStore

    ceilings = []
    for dose in (0.0, 1.0):
        ds = small_synth(train=200, valid=50, test=400)
        ds["synth"].update(domains={}, shortcut_private=dose)
        store = FeatureStore(build_store("synth", ds, tmp_path / f"d{dose}"))
        ceilings.append(store.ceiling("test", "main", ["text"])["corr"])
    assert ceilings[1] > ceilings[0] + 0.1, ceilings


def test_interaction_transfer_puts_a_pairwise_share_in_the_main_task_only():
    cfg = small_synth()["synth"]
    assert synth.task_shares(cfg) == {t: cfg["tasks"][t] for t in ("main", "pretrain")}
    shares = synth.task_shares({**cfg, "interaction_transfer": 0.6})
    assert shares["pretrain"]["pairwise"] == 0.0 and shares["main"]["pairwise"] == pytest.approx(0.6)
    for task in ("main", "pretrain"):
        assert shares[task]["interaction"] == 0.0
        assert sum(shares[task].values()) == pytest.approx(1.0)
        assert shares[task]["shared"] / shares[task]["private"] == pytest.approx(
            cfg["tasks"]["main"]["shared"] / cfg["tasks"]["main"]["private"])
    with pytest.raises(ValueError, match="interaction_transfer"):
        synth.task_shares({**cfg, "interaction_transfer": 1.5})


def test_the_transfer_dose_changes_only_the_main_labels():
    """Same tokens and pretraining labels at every dose; at dose 0 the two tasks are one function."""
    cfg = small_synth(train=400, valid=20, test=20)["synth"]
    splits = {k: synth.SynthGenerator({**cfg, "interaction_transfer": k}).split("train", 400) for k in (0.0, 0.5)}
    (zero, zero_oracle), (dosed, dosed_oracle) = splits[0.0], splits[0.5]
    for key in zero:
        if key.startswith("y/main"):
            assert not np.array_equal(zero[key], dosed[key]), key
        elif key != "ids":
            np.testing.assert_array_equal(zero[key], dosed[key])
    np.testing.assert_allclose(zero_oracle["main"], zero_oracle["pretrain"])
    corr = np.corrcoef(dosed_oracle["main"], dosed_oracle["pretrain"])[0, 1]
    assert 0.5 < corr < 0.85, corr  # about sqrt(1 - 0.5) before clipping
    plain = synth.SynthGenerator(cfg).split("train", 400)[0]
    assert not np.allclose(plain["x/audio"], zero["x/audio"])  # the pairwise latents are in the tokens
    np.testing.assert_array_equal(plain["x/vision"], zero["x/vision"])


def test_a_domain_at_scale_zero_is_the_source_and_scale_grows_the_shift():
    cfg = small_synth(train=20, valid=20, test=200)["synth"]
    gen = synth.SynthGenerator(cfg)
    spec = cfg["domains"]["target_all"]
    plain, _ = gen.split("test@t", 200, {"name": "t"})
    dist = []
    for scale in (0.0, 0.5, 1.0):
        x, _ = gen.split("test@t", 200, {"name": "t", **copy.deepcopy(spec), "scale": scale})
        dist.append(float(np.abs(x["x/audio"] - plain["x/audio"]).mean()))
    assert dist[0] == 0.0
    assert 0.0 < dist[1] < dist[2], dist


def test_diagnostics_read_against_their_thresholds():
    assert mechanisms.imbalance(1.0, {"a": 0.5, "b": 0.5}, {"a": 0.4, "b": 0.44}).present
    assert not mechanisms.imbalance(1.0, {"a": 0.5, "b": 0.5}, {"a": 0.4, "b": 0.47}).present  # every weak one
    assert mechanisms.transfer(0.6, 0.4, 0.5).present and not mechanisms.transfer(0.0, 0.48, 0.5).present
    assert mechanisms.degradation("shift", 1.0, 0.7, 0.9).present
    assert not mechanisms.degradation("shift", 0.0, 0.7, 0.7).present


def test_mechanisms_report_writes_a_figure_per_study_and_the_table(tmp_path):
    paths = []
    for study in ("balance", "shift"):
        for dose in (0.0, 1.0):
            for seed in (0, 1):
                point = {"study": study, "dose": dose, "seed": seed, "metric": "mae", "baseline": 0.8 + 0.1 * dose,
                         "diagnostic": {"value": 0.1 * dose + 0.01 * seed, "threshold": 0.05, "present": dose > 0,
                                        "detail": ""},
                         "gains": {"ogm_ge": 0.02 * dose} if study == "balance" else {}}
                path = tmp_path / f"{study}_{dose}_{seed}.json"
                path.write_text(json.dumps(point))
                paths.append(path)
    points = load_points(paths)
    table = diagnostics_table(points, tmp_path / "mech")
    text = table[0].read_text()
    assert "| balance | 1 | 2 | 0.105 ± 0.007 | 0.05 | 1.00 |" in text, text
    assert "| shift | 0 | 2 | 0.005 ± 0.007 | 0.05 | 0.00 |" in text, text
    for study in ("balance", "shift"):
        assert all(p.stat().st_size > 0 for p in plot_mechanism(points, study, tmp_path / study))


def test_peft_points_plot_the_gap_closed_against_trainable_parameters(tmp_path):
    paths = []
    for dose, seed in ((0.0, 0), (0.5, 0), (0.5, 1)):
        point = {"study": "peft", "dose": dose, "seed": seed, "metric": "corr", "baseline": 0.6,
                 "diagnostic": {"value": 0.6 * dose, "threshold": 0.1, "present": dose > 0, "detail": ""},
                 "gains": {"lora": 0.5 + 0.1 * seed if dose else None},
                 "trainable": {"lora": 1200, "linear_probe": 97, "full_finetune": 20000}}
        paths.append(tmp_path / f"{dose}_{seed}.json")
        paths[-1].write_text(json.dumps(point))
    points = load_points(paths)
    lora = points[points["key"] == "gain:lora"].set_index(["dose", "seed"])
    assert np.isnan(lora.loc[(0.0, 0), "value"]) and lora.loc[(0.5, 1), "value"] == pytest.approx(0.6)
    assert (lora["trainable"] == 1200).all()
    assert all(p.stat().st_size > 0 for p in plot_mechanism(points, "peft", tmp_path / "peft"))


def test_a_mechanism_sweep_must_name_a_method_of_its_family():
    cfg = default_config()
    cfg["mechanisms"]["studies"]["balance"]["methods"] = ["lora"]
    with pytest.raises(ConfigError, match=r"mechanisms\.studies\.balance\.methods\[0\]"):
        validate_config(cfg, load_schema(SCHEMA))
    cfg = default_config()
    cfg["mechanisms"]["studies"]["shift"]["domain"] = "nowhere"
    with pytest.raises(ConfigError, match=r"mechanisms\.studies\.shift\.domain"):
        validate_config(cfg, load_schema(SCHEMA))


def test_transfer_is_present_at_the_settings_dose_and_absent_at_zero(tmp_path):
    """Linear probe vs full fine-tuning of one pretrained backbone (measured on a loaded CPU, seed 0:
    500 training samples dose 0.5 gap 0.41, dose 0 0.004; 800 samples 0.353 and 0.005; threshold 0.10)."""
    dose = default_config()["datasets"]["synth_transfer"]["synth"]["interaction_transfer"]
    budget = mechanisms.Budget()
    valid = mechanisms.measure_transfer(_store(tmp_path, "dosed", 500, interaction_transfer=dose), budget, 0, dose)
    zero = mechanisms.measure_transfer(_store(tmp_path, "zero", 500, interaction_transfer=0.0), budget, 0, 0.0)
    assert valid.present, valid
    assert not zero.present, zero
    assert valid.value > zero.value + 0.1, (valid, zero)


@pytest.mark.parametrize("study", ["missing", "shift"])
def test_degradation_is_present_at_the_sweeps_top_dose_and_absent_at_zero(study, tmp_path):
    """The missing rate and the shift scale: the reference model's error rises by more than the
    threshold at the default sweep's largest dose, and not at dose 0 (tiny budget, one seed)."""
    sweep = default_config()["mechanisms"]["studies"][study]
    entry = small_synth(train=400, valid=200, test=300)
    budget = mechanisms.Budget(epochs=4)
    points = {dose: mechanisms.run_point(study, entry, dose, 0, budget, tmp_path / str(dose), domain=sweep.get("domain"))
              for dose in (sweep["doses"][-1], 0.0)}
    top, zero = points[sweep["doses"][-1]]["diagnostic"], points[0.0]["diagnostic"]
    assert top["present"], top
    assert not zero["present"], zero
