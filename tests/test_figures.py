"""Report figures fit their canvas (checked on the saved figure's artists), curves keep per-batch and
per-epoch series apart with readable legends, and no blank placeholder figure is written."""

from __future__ import annotations

import json

import pandas as pd

from conftest import balance_spec
from mmrepro.report import load_runs
from mmrepro.report.cggm import figure5, planned_figure5
from mmrepro.report.curves import curves_figure, panels
from mmrepro.report.figures import outside, overlapping_ticks, save
from mmrepro.report.missing import CURVES, curve_figure, missing_report, planned_curves
from mmrepro.report.plots import study_figure
from mmrepro.spec import DataSetting, MethodPlan


def _legend_labels(fig) -> list[str]:
    return [t.get_text() for leg in fig.legends for t in leg.get_texts()]


def test_a_study_plot_with_long_names_keeps_title_legend_and_ticks_on_its_canvas(tmp_path):
    """One narrow panel, eight long method names: the title and the legend used to be cut at both sides."""
    methods = [f"a_rather_long_method_name_{i}" for i in range(8)]
    rows = [{"study": "missing", "dataset": "synth", "method": m, "setting": "rate0.7", "seed": s, "task": "regression",
             "backbone": "late", "split": "test", "metric": "mae", "value": 1.0 + 0.01 * i + 0.001 * s, "oracle": 0.2,
             "ceiling": float("nan"), "trainable_params": 10, "backbone_params": 20.0, "path": f"{m}{s}"}
            for i, m in enumerate(methods) for s in (0, 1)]
    fig = study_figure(pd.DataFrame(rows))
    png, pdf = save(fig, tmp_path / "study")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and pdf.read_bytes()[:4] == b"%PDF"
    assert outside(fig) == []
    assert _legend_labels(fig) == [*methods, "oracle"]  # every entry kept


def test_crowded_tick_labels_are_set_apart(tmp_path):
    lams = [0.05, 0.075, 0.1, 0.125, 0.15, 0.175, 0.2, 0.25, 0.3, 0.35]
    sw = {"rho": pd.DataFrame({"rho": [1.3], "mean": [0.01], "std": [0.002], "count": [2]}),
          "lam": pd.DataFrame({"lam": lams, "mean": [0.01] * len(lams), "std": [0.0] * len(lams), "count": [2] * len(lams)})}
    fig = figure5({"synth": (sw, "joint - CGGM test mae")})
    save(fig, tmp_path / "fig5")
    assert overlapping_ticks(fig) == [] and outside(fig) == []
    assert [t.get_text() for t in fig.axes[1].get_xticklabels()] == [f"{x:g}" for x in lams]  # the swept values


def test_figure5_without_points_is_no_figure():
    empty = pd.DataFrame(columns=["rho", "mean", "std", "count"])
    assert figure5({"synth": ({"rho": empty, "lam": empty.rename(columns={"rho": "lam"})}, "gain")}) is None


def _history(method, per, steps, keys, setting="target_all"):
    return [{"backbone": "late", "method": method, "setting": setting, "seed": 0, "per": per, "step": i, "key": k,
             "value": 1.0 / (i + 1)} for i in range(steps) for k in keys]


def test_per_batch_and_per_epoch_series_get_their_own_axes():
    h = pd.DataFrame(_history("casp", "epoch", 3, ["target_error"]) + _history("tent", "batch", 40, ["target_error"]))
    assert panels(h) == [("target_error", "epoch"), ("target_error", "batch")]
    fig = curves_figure(h)
    assert [ax.get_xlabel() for ax in fig.axes] == ["epoch", "batch"]
    assert [line.get_xdata()[-1] for line in fig.axes[0].lines] == [2] and fig.axes[1].lines[0].get_xdata()[-1] == 39


def test_curve_legends_name_each_run_and_each_modality_once(tmp_path):
    keys = ["util_text", "util_audio", "util_vision"]
    h = pd.DataFrame([r for m in ("joint", "cggm", "ogm_ge_with_a_long_name") for r in _history(m, "epoch", 4, keys,
                                                                                               "complete")])
    fig = curves_figure(h)
    save(fig, tmp_path / "curves")
    assert _legend_labels(fig) == ["joint/complete", "cggm/complete", "ogm_ge_with_a_long_name/complete",
                                   "audio", "text", "vision"]  # 3 + 3 entries, not one per line (9)
    assert outside(fig) == []


def _spec(method="mplmm", setting="rate0.7", rate=0.7, test_rates=(0.0, 0.5), transform="mplmm", params=None):
    return balance_spec(method=method, setting=setting,
                        data_setting=DataSetting(type="missing", params={"rate": rate, "test_rates": list(test_rates)}),
                        plan=MethodPlan(transform=transform, hook="joint", adapter="source_only"),
                        method_params={transform: params or {}, "joint": {}, "source_only": {}})


def test_only_curves_with_a_line_are_planned():
    assert planned_curves([_spec(), _spec(method="modality_dropout", transform="modality_dropout")]) == ["test"]
    assert planned_curves([_spec(test_rates=())]) == []
    two_rates = [_spec(), _spec(setting="rate0.3", rate=0.3)]
    assert planned_curves(two_rates) == ["test", "train"]
    lengths = [_spec(), _spec(method="mplmm_l4", params={"prompt_length": 4})]  # 16: the class default
    assert planned_curves(lengths) == ["test", "prompt"]


def test_a_curve_without_a_line_is_not_written(tmp_path):
    doc = {"study": "missing", "dataset": "synth", "method": "mplmm", "setting": "rate0.7", "seed": 0,
           "task": "classification", "backbone": "mplmm_mult", "trainable_params": 7, "backbone_params": 100,
           "metrics": {"test": {"acc": 0.7}, "test:available:text": {"acc": 0.6}, "test:available:audio": {"acc": 0.5},
                       "test:avg": {"acc": 0.55}, "test:rate:0.5": {"acc": 0.6}}}
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps(doc))
    (run / "config.json").write_text(_spec(test_rates=(0.5,)).to_json())
    points, xlabel = CURVES["test"]
    assert curve_figure(points(load_runs([run / "metrics.json"])), xlabel) is None
    written = missing_report([run / "metrics.json"], tmp_path / "cases", {"test": tmp_path / "rates"})
    assert not (tmp_path / "rates.png").exists() and (tmp_path / "cases.html") in written


def test_figure5_is_planned_only_beside_joint_training():
    def spec(method, hook, params=None, seed=0):
        return balance_spec(method=method, seed=seed,
                            plan=MethodPlan(transform="full_finetune", hook=hook, adapter="source_only"),
                            method_params={"full_finetune": {}, hook: params or {}, "source_only": {}})
    assert planned_figure5([spec("joint", "joint"), spec("cggm", "cggm")])
    assert not planned_figure5([spec("cggm", "cggm")])
    assert not planned_figure5([spec("joint", "joint"), spec("cggm_direction", "cggm", {"magnitude": False})])


def test_a_missing_curve_fits_its_canvas(tmp_path):
    points = pd.DataFrame([{"dataset": "synth", "task": "regression", "metric": "mae", "seed": s, "x": x,
                            "line": line, "value": 1.0 + x / 10 + s / 100}
                           for line in ("mplmm", "modality_dropout", "modality_substitution")
                           for x in (0.0, 0.3, 0.5, 0.7, 0.9) for s in (0, 1)])
    fig = curve_figure(points, CURVES["test"][1])
    save(fig, tmp_path / "rates")
    assert outside(fig) == [] and overlapping_ticks(fig) == []
