"""The CGGM paper's Tables 5, 6 and Figure 5, computed from (hand-made) balance runs."""

from __future__ import annotations

import json

import pytest

from conftest import balance_spec
from mmrepro.cli import main
from mmrepro.report.cggm import as_table, by_dataset, load_balance_runs, sweeps, table5, table6
from mmrepro.spec import DataSetting, MethodPlan


def _run(root, method, seed, *, setting="complete", params=None, modalities=None, mae=0.8, util=None, best=2,
         valid_acc=0.6, dataset="synth", test=None):
    d = root / dataset / method / setting / f"seed{seed}"
    d.mkdir(parents=True)
    hook = "cggm" if method.startswith("cggm") else "joint"
    spec = balance_spec(dataset=dataset, plan=MethodPlan(transform="full_finetune", hook=hook, adapter="source_only"),
                        method_params={"full_finetune": {}, hook: params or {}, "source_only": {}},
                        data_setting=DataSetting(type="subset" if modalities else "complete",
                                                 params={"modalities": modalities} if modalities else {}))
    history = [{"epoch": e, "valid_loss": 1.0, **{f"util_{m}": v + (0.0 if e == best else 0.3) for m, v in
                                                  (util or {}).items()}} for e in (1, 2, 3)]
    metrics = {"method": method, "setting": setting, "seed": seed, "best_epoch": best,
               "metrics": {"valid": {"mae": mae, "acc2_has0": valid_acc}, "test": test or {"mae": mae, "corr": 0.5}}}
    (d / "config.json").write_text(spec.to_json())
    (d / "history.json").write_text(json.dumps(history))
    (d / "metrics.json").write_text(json.dumps(metrics))
    return d / "metrics.json"


@pytest.fixture
def runs(tmp_path):
    paths = []
    for seed in (0, 1):
        paths += [_run(tmp_path, "joint", seed, mae=0.9, util={"a": 0.5 + 0.1 * seed, "b": 0.4}),
                  _run(tmp_path, "cggm", seed, mae=0.8, util={"a": 0.7, "b": 0.6 + 0.1 * seed}),
                  _run(tmp_path, "joint", seed, setting="only_a", modalities=["a"], valid_acc=0.55 + 0.1 * seed),
                  _run(tmp_path, "cggm_direction", seed, params={"lam": 0.1, "magnitude": False}, mae=0.85),
                  _run(tmp_path, "cggm_magnitude", seed, params={"rho": 1.0, "lam": 0.0}, mae=0.87),
                  _run(tmp_path, "cggm_rho2", seed, params={"rho": 2.0}, mae=0.95),
                  _run(tmp_path, "cggm_lam0p5", seed, params={"lam": 0.5}, mae=0.7 + 0.1 * seed)]
    return paths


def test_table5_reads_probe_accuracy_at_the_best_epoch_and_the_unimodal_runs(runs):
    t5 = table5(load_balance_runs(runs))
    assert list(t5.columns) == ["a", "b"]
    assert t5.loc["unimodal", "a"] == pytest.approx([0.55, 0.65]) and t5.loc["unimodal", "b"] == []
    assert t5.loc["joint", "a"] == pytest.approx([0.5, 0.6])  # best epoch 2, not the later 0.8
    assert t5.loc["joint + CGGM", "b"] == pytest.approx([0.6, 0.7])


def test_table6_groups_the_ablation_by_resolved_parameters(runs):
    t6 = table6(load_balance_runs(runs))
    assert t6.loc["magnitude only (lambda 0)", "mae"] == pytest.approx([0.87, 0.87])
    assert t6.loc["direction only (no magnitude)", "mae"] == pytest.approx([0.85, 0.85])
    assert t6.loc["both (CGGM)", "mae"] == pytest.approx([0.8, 0.8]) and t6.loc["joint", "mae"] == pytest.approx([0.9, 0.9])


def test_the_tables_show_percent_the_best_in_bold_and_leave_out_empty_rows_and_equal_columns(runs):
    loaded = load_balance_runs(runs)
    t5 = as_table(table5(loaded), "", {"a": "acc2_has0", "b": "acc2_has0"})
    cells = {r.ids[0]: [c.text for c in r.cells] for r in t5.rows}
    assert cells["unimodal"] == ["60.0±7.1", ""] and cells["joint + CGGM"][0] == "70.0±0.0"
    assert [r.ids[0] for r in t5.rows if r.cells[0].best] == ["joint + CGGM"]
    t6 = table6(loaded)
    t6["mae_copy"] = t6["mae"]
    table = as_table(t6, "", {"mae": "mae", "corr": "corr", "mae_copy": "mae"})
    assert table.header == ("Corr ↑", "MAE ↓")  # the copy equals mae in every cell
    best = [r.ids[0] for r in table.rows if r.cells[1].best]
    assert best == ["both (CGGM)"]  # the lowest MAE
    assert any("mae_copy = mae" in n for n in table.notes)


def test_sweeps_measure_the_gain_over_joint_per_seed(runs):
    sw = sweeps(load_balance_runs(runs))
    rho = sw["rho"].set_index("rho")
    # at lambda 0.2: rho 1.3 (the cggm runs, gain 0.1) and rho 2.0 (gain -0.05); magnitude-only is at lambda 0
    assert rho["mean"].to_dict() == pytest.approx({1.3: 0.1, 2.0: -0.05})
    lam = sw["lam"].set_index("lam")
    assert lam["mean"].to_dict() == pytest.approx({0.2: 0.1, 0.5: 0.15})  # lambda 0.5: gains 0.2 and 0.1
    assert lam.loc[0.5, "count"] == 2


def test_cli_writes_the_tables_and_the_plot(runs, tmp_path):
    assert main(["cggm-report", "--table", str(tmp_path / "t"), "--plot", str(tmp_path / "p"), *map(str, runs)]) == 0
    text = (tmp_path / "t.md").read_text()
    assert "Table 5" in text and "Table 6" in text and "joint - CGGM test mae" in text
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_dataset_gets_its_own_tables_and_gains_in_its_own_metric(runs, tmp_path):
    # a segmentation dataset beside the regression one: gains against its own joint runs, in mean Dice
    seg = [_run(tmp_path, m, 0, dataset="brats", test={"dice_mean": dice}) for m, dice in (("joint", 0.5), ("cggm", 0.6))]
    by = {d: sweeps(rs)["rho"].set_index("rho")["mean"].to_dict() for d, rs in by_dataset(load_balance_runs(runs + seg)).items()}
    assert by["synth"] == pytest.approx({1.3: 0.1, 2.0: -0.05}) and by["brats"] == pytest.approx({1.3: 0.1})
    assert main(["cggm-report", "--table", str(tmp_path / "t"), "--plot", str(tmp_path / "p"), *map(str, runs + seg)]) == 0
    text = (tmp_path / "t.md").read_text()
    assert text.index("## synth") < text.index("joint - CGGM test mae") < text.index("## brats")
    assert "CGGM - joint test dice_mean" in text[text.index("## brats"):]
