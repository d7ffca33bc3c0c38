"""The missing study's report: Table 1 layout (per available set + Avg, LB assembled from its
per-set models), trainable share, and the curve over the test missing rate."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmrepro.cli import main
from mmrepro.report.missing import case_table

SETS = ["text", "audio", "vision", "text.audio", "text.vision", "audio.vision"]


def write(tmp_path, method, setting, seed, metrics, trainable=10, total=100, rate=0.7, params=None):
    path = tmp_path / method / setting / f"seed{seed}" / "metrics.json"
    path.parent.mkdir(parents=True)
    transform = "full_finetune" if method == "lower_bound" else "mplmm"
    (path.parent / "config.json").write_text(json.dumps({
        "data_setting": {"type": "available" if method == "lower_bound" else "missing", "params": {"rate": rate}},
        "plan": {"transform": transform}, "method_params": {transform: params or {}}}))
    path.write_text(json.dumps({"study": "missing", "dataset": "synth", "method": method, "setting": setting,
                                "seed": seed, "task": "classification", "label": "main", "backbone": "mplmm_mult",
                                "metrics": metrics, "trainable_params": trainable, "total_params": total}))
    return path


def runs(tmp_path):
    paths = []
    for seed in (0, 1):
        cases = {f"test:available:{s}": {"acc": 0.5 + 0.05 * i + 0.01 * seed, "f1_weighted": 0.4} for i, s in enumerate(SETS)}
        rates = {f"test:rate:{r}": {"acc": 0.9 - r / 2 + 0.01 * seed, "f1_weighted": 0.4} for r in (0, 0.5)}
        metrics = {"test": {"acc": 0.7, "f1_weighted": 0.4}, **cases, **rates,
                   "test:avg": {"acc": float(np.mean([c["acc"] for c in cases.values()])), "f1_weighted": 0.4}}
        paths.append(write(tmp_path, "mplmm", "rate0.7", seed, metrics, trainable=7, total=100))
        for i, s in enumerate(SETS):  # the lower bound: one model per available set
            acc = 0.3 + 0.1 * i + 0.02 * seed
            paths.append(write(tmp_path, "lower_bound", f"lb_{i}", seed,
                               {"test": {"acc": acc, "f1_weighted": 0.2}, f"test:available:{s}": {"acc": acc, "f1_weighted": 0.2}},
                               trainable=50, total=50))
    return paths


def test_case_table_assembles_the_lower_bound_and_averages_over_sets(tmp_path):
    from mmrepro.report import load_runs

    table = case_table(load_runs(runs(tmp_path)))
    acc = table[table["metric"] == "acc"].set_index(["method", "case"])
    lb_avg = np.mean([np.mean([0.3 + 0.1 * i + 0.02 * seed for i in range(6)]) for seed in (0, 1)])
    assert acc.loc[("lower_bound", "avg"), "mean"] == pytest.approx(lb_avg)
    assert acc.loc[("lower_bound", "avg"), "n"] == 2
    assert acc.loc[("mplmm", "audio"), "mean"] == pytest.approx(0.555)
    assert acc.loc[("mplmm", "avg"), "std"] > 0
    assert acc.loc[("mplmm", "avg"), "trainable_share"] == pytest.approx(0.07)
    assert set(acc.index.get_level_values("case")) == {*SETS, "avg"}


def test_training_rate_and_prompt_length_curves_read_each_runs_config(tmp_path):
    from mmrepro.report import load_runs
    from mmrepro.report.missing import prompt_length_points, train_rate_points

    paths = runs(tmp_path)
    for rate, length in [(0.3, 16), (0.7, 4)]:
        paths.append(write(tmp_path, "mplmm" if length == 16 else f"mplmm_l{length}", f"rate{rate}", 0,
                           {"test:avg": {"acc": rate, "f1_weighted": 0.1}}, rate=rate,
                           params={} if length == 16 else {"prompt_length": length}))
    frame = load_runs(paths)
    train = train_rate_points(frame).query("metric == 'acc'")
    assert sorted(set(zip(train["line"], train["x"]))) == [("mplmm", 0.3), ("mplmm", 0.7), ("mplmm_l4", 0.7)]
    prompt = prompt_length_points(frame).query("metric == 'acc'")
    assert sorted(set(zip(prompt["line"], prompt["x"]))) == [("mplmm (rate0.3)", 16.0), ("mplmm (rate0.7)", 4.0),
                                                            ("mplmm (rate0.7)", 16.0)]  # 16: the class default
    out = tmp_path / "out"
    assert main(["missing-report", "--table", str(out / "cases"), "--plot", str(out / "rates"), "--train-rate-plot",
                 str(out / "train"), "--prompt-length-plot", str(out / "prompt"), *map(str, paths)]) == 0
    assert all((out / f"{stem}.png").read_bytes()[:4] == b"\x89PNG" for stem in ("rates", "train", "prompt"))


def test_cli_writes_table_and_rate_curve(tmp_path):
    paths = runs(tmp_path)
    out = tmp_path / "out"
    assert main(["missing-report", "--table", str(out / "cases"), "--plot", str(out / "rates"), *map(str, paths)]) == 0
    md = (out / "cases.md").read_text()
    assert "| method | text | audio | vision | text.audio | text.vision | audio.vision | avg |" in md
    assert "7 (7.0%)" in md
    assert (out / "rates.png").read_bytes()[:4] == b"\x89PNG"
