"""Paired differences, their bootstrap interval against a direct computation, the verdict rule (a
verdict flips when the data flips), the study table's paired column and the claims ledger's table."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from conftest import default_config
from mmrepro.config import paired_planned, paired_reference
from mmrepro.report.ledger import write_ledger
from mmrepro.report.paired import (CONTRADICTED, HOLDS, UNDECIDED, Bootstrap, Interval, add_paired,
                                   bootstrap_interval, claim_verdict, paired_differences, paired_frame, plot_paired,
                                   verdict)
from mmrepro.report.tables import RUN_COLUMNS, summarize, write_table


def _runs(values: dict[str, list[float]], metric: str = "mae", split: str = "test", study: str = "balance",
          setting: str = "complete") -> pd.DataFrame:
    """A load_runs-shaped frame: one run per method and seed (seed i holds values[method][i])."""
    rows = [{"study": study, "dataset": "synth", "method": method, "setting": setting, "seed": seed,
             "task": "regression", "backbone": "late", "split": split, "metric": metric, "value": v,
             "oracle": math.nan, "ceiling": math.nan, "trainable_params": 10, "backbone_params": 10.0, "path": ""}
            for method, vals in values.items() for seed, v in enumerate(vals)]
    return pd.DataFrame(rows, columns=list(RUN_COLUMNS))


def test_paired_differences_match_seed_by_seed_and_drop_unpaired_seeds():
    runs = _runs({"joint": [1.0, 2.0, 3.0], "cggm": [0.5, 2.5]})
    diffs = paired_differences(runs, "cggm", "joint", "mae")
    assert diffs["seed"].tolist() == [0, 1] and diffs["diff"].tolist() == pytest.approx([-0.5, 0.5])
    marked = runs.replace({"method": {"cggm": "cggm [target labels]"}})
    assert paired_differences(marked, "cggm", "joint", "mae")["diff"].tolist() == pytest.approx([-0.5, 0.5])


def test_the_interval_is_the_direct_bootstrap_computation():
    diffs = [0.03, -0.01, 0.02, 0.05, 0.00, 0.04, 0.01, 0.02]
    boot = Bootstrap(level=0.9, resamples=2000, seed=7)
    iv = bootstrap_interval(diffs, boot)
    # the same thing written out: one resample of the seeds at a time, its mean, then the quantiles
    rng = np.random.default_rng(7)
    means = []
    for _ in range(2000):
        idx = rng.integers(0, len(diffs), len(diffs))
        means.append(sum(diffs[i] for i in idx) / len(diffs))
    means.sort()
    lo, hi = np.quantile(means, [0.05, 0.95])
    assert iv.n == 8 and iv.mean == pytest.approx(sum(diffs) / 8)
    assert iv.low == pytest.approx(lo, abs=1e-12) and iv.high == pytest.approx(hi, abs=1e-12)
    assert min(diffs) < iv.low < iv.mean < iv.high < max(diffs)
    assert bootstrap_interval(diffs, boot) == iv, "seeded: the same interval every time"
    flat = bootstrap_interval([0.2] * 5, boot)
    assert (flat.mean, flat.low, flat.high, flat.n) == (pytest.approx(0.2), pytest.approx(0.2), pytest.approx(0.2), 5)
    assert bootstrap_interval([], boot).n == 0


@pytest.mark.parametrize("metric", ["mae", "corr"])
def test_a_verdict_flips_when_the_data_flips(metric):
    better = -1.0 if metric == "mae" else 1.0  # the direction in the method's favour
    gains = np.array([0.05, 0.03, 0.04, 0.06, 0.02, 0.05, 0.04, 0.03])
    for data, expected in ((better * gains, HOLDS), (-better * gains, CONTRADICTED),
                           (np.r_[gains, -gains], UNDECIDED)):
        runs = _runs({"rival": [0.5] * len(data), "method": list(0.5 + data)}, metric=metric)
        iv = bootstrap_interval(paired_differences(runs, "method", "rival", metric)["diff"])
        assert verdict(iv, metric) == expected, (metric, data.tolist(), iv)
    assert verdict(Interval(math.nan, math.nan, math.nan, 0), metric) == UNDECIDED


def test_a_claim_holds_only_when_every_comparison_holds():
    assert claim_verdict([HOLDS, HOLDS]) == HOLDS
    assert claim_verdict([HOLDS, UNDECIDED]) == UNDECIDED
    assert claim_verdict([HOLDS, CONTRADICTED, UNDECIDED]) == CONTRADICTED
    assert claim_verdict([]) == UNDECIDED


def test_the_study_table_and_plot_carry_the_paired_difference(tmp_path):
    runs = _runs({"joint": [0.70, 0.72, 0.71, 0.69], "cggm": [0.65, 0.66, 0.67, 0.64], "agm": [0.71, 0.70, 0.73, 0.70]})
    summary = add_paired(summarize(runs), runs, "joint", Bootstrap(resamples=500))
    row = summary.set_index("method").loc["cggm"]
    assert row["mae_paired"] == pytest.approx(-0.05) and row["mae_paired_low"] < row["mae_paired"] < row["mae_paired_high"] < 0
    assert math.isnan(summary.set_index("method").loc["joint", "mae_paired"])
    md = write_table(summary, tmp_path / "balance")[0].read_text()
    cggm_line = next(line for line in md.splitlines() if line.startswith("| cggm |"))
    assert "MAE paired Δ [CI]" in md and "-0.050 [" in cggm_line and "resamples of the seeds" in " ".join(md.split())
    assert paired_frame(runs, "joint").set_index("method").loc["cggm", "verdict"] == HOLDS
    assert add_paired(summarize(runs), runs, "ssa").equals(summarize(runs)), "no reference runs: unchanged"
    png, pdf = plot_paired(runs, "joint", tmp_path / "paired")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and pdf.stat().st_size > 0
    with pytest.raises(ValueError, match="reference method 'ssa'"):
        plot_paired(runs, "ssa", tmp_path / "none")
    assert not (tmp_path / "none.png").exists(), "no blank figure"


def test_the_paired_plot_is_planned_only_where_the_reference_runs_beside_another_method():
    config = default_config()
    assert paired_reference(config, "balance") == "joint" and paired_planned(config, "balance")
    config["studies"]["balance"]["methods"] = ["cggm", "agm"]  # no joint: no reference row
    assert paired_reference(config, "balance") is None and not paired_planned(config, "balance")
    config["studies"]["balance"]["methods"] = ["joint"]  # nothing beside it
    assert not paired_planned(config, "balance")


def test_the_ledger_table_decides_each_claim_and_form(tmp_path):
    gains = [0.05, 0.03, 0.04, 0.06, 0.02, 0.05, 0.04, 0.03]
    runs = pd.concat([
        _runs({"joint": [0.7] * 8, "agm": [0.7 + g / 2 for g in gains], "cggm": [0.7 - g for g in gains],
               "cggm_code [target labels]": [0.7 + g for g in gains]}),
        _runs({"lora": [0.5] * 8, "wander": [0.5 + g * (-1) ** i for i, g in enumerate(gains)]}, study="peft"),
    ], ignore_index=True)
    claims = [{"id": "cggm", "paper": "CGGM", "wording": "outperforms all | baselines", "study": "balance",
               "dataset": "synth", "settings": ["complete"], "method": "cggm", "code_variant": "cggm_code",
               "rivals": ["joint", "agm"], "metrics": ["mae"], "split": "test", "dose": "synth: dose 1"},
              {"id": "wander", "paper": "Wander", "wording": "outperforms", "study": "peft", "dataset": "synth",
               "settings": ["complete"], "method": "wander", "rivals": ["lora"], "metrics": ["mae"], "split": "test",
               "dose": ""}]
    spec = json.loads(json.dumps({"claims": claims, "bootstrap": {"level": 0.95, "resamples": 1000, "seed": 0},
                                  "budget": ["Budget 'tiny': for a test."]}))
    searches = [{"study": "balance", "method": "cggm", "default_point": False, "trial": 3, "trials": 6,
                 "params": {"methods.cggm.rho": 0.81234, "methods.greedy.window": 4}, "value": 0.61}]
    md, csv, png, _ = write_ledger(runs, spec, tmp_path / "claims", tmp_path / "claims_plot", searches)
    comp = pd.read_csv(csv)
    decided = comp.groupby(["claim", "form"])["verdict"].agg(list).to_dict()
    assert decided == {("cggm", "paper"): [HOLDS, HOLDS], ("cggm", "released code"): [CONTRADICTED, CONTRADICTED],
                       ("wander", "paper"): [UNDECIDED]}
    text = md.read_text()
    assert "**holds**" in text and "**contradicted**" in text and "**undecided**" in text
    assert "target labels" in text and "Budget 'tiny'" in text and "outperforms all \\| baselines" in text
    assert "balance / cggm: trial 3 of 6 (methods.cggm.rho = 0.812, methods.greedy.window = 4)" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
