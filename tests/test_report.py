"""Tests for mmrepro.report: metrics.json -> tables (md/csv/tex) and plots (png/pdf)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from mmrepro.report import load_runs, plot_study, summarize, write_table

# Known MAE per (method, setting) over seeds 0, 1, 2. Methods are given with
# "unimodal" first and settings with "complete" first, so neither order is
# alphabetical: the summary must keep order of first appearance.
METHODS = ["unimodal", "joint"]
SETTINGS = ["complete", "0.3"]
MAE = {
    ("unimodal", "complete"): [0.80, 0.80, 0.83],
    ("unimodal", "0.3"): [0.90, 0.95, 1.00],
    ("joint", "complete"): [0.60, 0.62, 0.67],
    ("joint", "0.3"): [0.70, 0.70, 0.70],
}
ORACLE_TEST = {"mae": 0.24, "corr": 0.98, "acc2_has0": 0.95, "f1_has0": 0.95,
               "acc2_non0": 0.96, "f1_non0": 0.96, "acc5": 0.70, "acc7": 0.65}


def _doc(method, setting, seed, mae, *, dataset="synth", oracle=None, study="balance"):
    test = {"mae": mae, "corr": 0.8 - seed * 0.01, "acc2_has0": 0.81, "f1_has0": 0.81,
            "acc2_non0": 0.82, "f1_non0": 0.82, "acc5": 0.45, "acc7": 0.40}
    return {
        "study": study, "dataset": dataset, "method": method, "setting": setting, "seed": seed,
        "task": "regression", "backbone": "late",
        "metrics": {"test": test, "valid": {**test, "mae": mae - 0.01}},
        "oracle": {"test": dict(ORACLE_TEST)} if oracle is None else oracle,
        "best_epoch": 7, "epochs_run": 10, "trainable_params": 1000 + seed, "total_params": 2000,
    }


def _write(path: Path, doc) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return path


@pytest.fixture
def run_files(tmp_path) -> list[Path]:
    files = []
    for method in METHODS:
        for setting in SETTINGS:
            for seed, mae in enumerate(MAE[(method, setting)]):
                files.append(_write(tmp_path / "runs" / method / setting / str(seed) / "metrics.json",
                                    _doc(method, setting, seed, mae)))
    return files


@pytest.fixture
def runs(run_files) -> pd.DataFrame:
    return load_runs(run_files)


def test_load_runs_long_frame(runs, run_files):
    for col in ["study", "dataset", "method", "setting", "seed", "task", "backbone",
                "split", "metric", "value", "oracle", "trainable_params"]:
        assert col in runs.columns
    assert len(runs) == len(run_files) * 2 * 8  # 12 files x 2 splits x 8 metrics
    row = runs[(runs.method == "joint") & (runs.setting == "complete") & (runs.seed == 2)
               & (runs.split == "test") & (runs.metric == "mae")]
    assert row["value"].item() == pytest.approx(0.67)
    assert row["oracle"].item() == pytest.approx(0.24)
    assert row["trainable_params"].item() == 1002
    # No oracle for the valid split -> NaN.
    assert runs[runs.split == "valid"]["oracle"].isna().all()


def test_csv_means_and_stds_match_hand_computed(runs, tmp_path):
    summary = summarize(runs)
    paths = write_table(summary, tmp_path / "out" / "nested" / "table")
    assert [p.name for p in paths] == ["table.md", "table.csv", "table.tex", "table.html"]
    csv = pd.read_csv(tmp_path / "out" / "nested" / "table.csv", dtype={"setting": str})

    assert list(csv["method"]) == ["unimodal", "unimodal", "joint", "joint"]
    assert list(csv["setting"]) == ["complete", "0.3", "complete", "0.3"]
    assert list(csv["n"]) == [3, 3, 3, 3]
    idx = csv.set_index(["method", "setting"])
    # joint/complete: 0.60 0.62 0.67 -> mean 0.63; deviations -.03 -.01 .04 -> var .0026/2
    assert idx.loc[("joint", "complete"), "mae_mean"] == pytest.approx(0.63)
    assert idx.loc[("joint", "complete"), "mae_std"] == pytest.approx(math.sqrt(0.0013))
    # unimodal/0.3: 0.90 0.95 1.00 -> mean 0.95, std 0.05
    assert idx.loc[("unimodal", "0.3"), "mae_mean"] == pytest.approx(0.95)
    assert idx.loc[("unimodal", "0.3"), "mae_std"] == pytest.approx(0.05)
    # joint/0.3: constant -> std 0
    assert idx.loc[("joint", "0.3"), "mae_std"] == pytest.approx(0.0, abs=1e-12)
    # corr 0.80 0.79 0.78 -> mean .79 std .01
    assert idx.loc[("joint", "0.3"), "corr_mean"] == pytest.approx(0.79)
    assert idx.loc[("joint", "0.3"), "corr_std"] == pytest.approx(0.01)
    assert (csv["mae_oracle"] == 0.24).all()
    # Default regression metrics, in order, and not acc5.
    assert [c[:-5] for c in csv.columns if c.endswith("_mean")] == [
        "mae", "corr", "acc2_has0", "f1_has0", "acc2_non0", "f1_non0", "acc7"]


def test_markdown_has_oracle_row_and_plus_minus(runs, tmp_path):
    write_table(summarize(runs), tmp_path / "t")
    md = (tmp_path / "t.md").read_text(encoding="utf-8")
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert table[0].startswith("| setting | method | params | MAE ↓ |")
    assert "0.630±0.036" in md
    oracle = [line for line in table if "oracle" in line]
    assert len(oracle) == 2 and all("| 0.240 |" in line for line in oracle)  # a row per setting, not a column
    # header, alignment row, 2 settings x (2 methods + the oracle)
    assert len(table) == 8


def test_latex_escapes_underscores_and_uses_booktabs(runs, tmp_path):
    write_table(summarize(runs), tmp_path / "t")
    tex = (tmp_path / "t.tex").read_text(encoding="utf-8")
    assert r"acc2\_has0" in tex  # in the note on metrics shown once
    assert "acc2_has0" not in tex.replace(r"\_", "")
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}", r"\end{tabular}"):
        assert rule in tex
    assert r"0.630$\pm$0.036" in tex
    assert r"\begin{tabular}{llrrrrrr}" in tex  # setting, method, params and five metrics


def test_row_order_sorted_dataset_then_first_appearance(tmp_path):
    files = []
    for ds in ["zeta", "alpha"]:
        for method in ["m2", "m1"]:
            for setting in ["s2", "s1"]:
                for seed in (0, 1):
                    files.append(_write(tmp_path / ds / method / setting / f"{seed}.json",
                                        _doc(method, setting, seed, 0.5 + seed / 10, dataset=ds)))
    s = summarize(load_runs(files))
    assert list(zip(s.dataset, s.method, s.setting)) == [
        (d, m, st) for d in ["alpha", "zeta"] for m in ["m2", "m1"] for st in ["s2", "s1"]]


def test_single_seed_shows_mean_only(tmp_path):
    f = _write(tmp_path / "a.json", _doc("joint", "complete", 0, 0.5))
    s = summarize(load_runs([f]))
    assert s["n"].tolist() == [1]
    assert math.isnan(s["mae_std"].iloc[0])
    write_table(s, tmp_path / "one")
    md = (tmp_path / "one.md").read_text(encoding="utf-8")
    assert "| 0.500 |" in md and "0.500±" not in md


def test_plot_writes_png_and_pdf(runs, tmp_path):
    paths = plot_study(runs, tmp_path / "fig" / "study")
    png, pdf = tmp_path / "fig" / "study.png", tmp_path / "fig" / "study.pdf"
    assert paths == [png, pdf]
    assert png.stat().st_size > 1000 and pdf.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pdf.read_bytes()[:5] == b"%PDF-"
    # atomic write leaves no temp files behind
    assert sorted(p.name for p in (tmp_path / "fig").iterdir()) == ["study.pdf", "study.png"]


def test_malformed_json_raises_naming_file(run_files, tmp_path):
    bad = _write(tmp_path / "broken" / "metrics.json", "{not json")
    with pytest.raises(ValueError, match="broken"):
        load_runs([*run_files, bad])


def test_missing_key_raises_naming_file_and_key(tmp_path):
    doc = _doc("joint", "complete", 0, 0.5)
    del doc["method"]
    bad = _write(tmp_path / "nomethod" / "metrics.json", doc)
    with pytest.raises(ValueError, match=r"nomethod.*'method'"):
        load_runs([bad])


def test_non_numeric_metric_raises(tmp_path):
    doc = _doc("joint", "complete", 0, 0.5)
    doc["metrics"]["test"]["mae"] = "0.5"
    bad = _write(tmp_path / "strval.json", doc)
    with pytest.raises(ValueError, match=r"strval.*metrics\.test\.mae"):
        load_runs([bad])


def test_inconsistent_oracle_across_seeds_raises(run_files, tmp_path):
    doc = _doc("joint", "complete", 3, 0.61, oracle={"test": {**ORACLE_TEST, "mae": 0.30}})
    extra = _write(tmp_path / "seed3.json", doc)
    runs = load_runs([*run_files, extra])
    with pytest.raises(ValueError, match="oracle"):
        summarize(runs)


def test_missing_oracle_is_fine_and_omitted_from_markdown(tmp_path):
    files = [_write(tmp_path / f"{s}.json", _doc("joint", "complete", s, 0.5 + s / 10, oracle={}))
             for s in range(3)]
    s = summarize(load_runs(files))
    assert s["mae_oracle"].isna().all()
    write_table(s, tmp_path / "real")
    assert "oracle" not in (tmp_path / "real.md").read_text(encoding="utf-8")
    assert "mae_oracle" in (tmp_path / "real.csv").read_text()
    plot_study(load_runs(files), tmp_path / "real")  # no oracle line, must not fail


def test_duplicate_runs_raise(run_files):
    runs = load_runs([*run_files, run_files[0]])
    with pytest.raises(ValueError, match="more than once"):
        summarize(runs)


def test_reference_adds_paper_column(runs, tmp_path):
    ref = pd.DataFrame({"dataset": ["synth", "synth"], "method": ["joint", "unimodal"],
                        "setting": ["complete", None], "metric": ["mae", "mae"],
                        "value": [0.59, 0.81]})
    s = summarize(runs, reference=ref)
    idx = s.set_index(["method", "setting"])
    assert idx.loc[("joint", "complete"), "mae_paper"] == pytest.approx(0.59)
    assert math.isnan(idx.loc[("joint", "0.3"), "mae_paper"])
    assert idx.loc[("unimodal", "0.3"), "mae_paper"] == pytest.approx(0.81)  # setting-free row
    assert "corr_paper" not in s.columns
    write_table(summarize(runs), tmp_path / "r", reference=ref)
    md = (tmp_path / "r.md").read_text(encoding="utf-8")
    assert "| MAE paper | MAE Δ paper |" in md and "| 0.590 | +0.040 |" in md


def test_classification_defaults(tmp_path):
    files = []
    for seed, acc in enumerate([0.70, 0.74]):
        doc = _doc("joint", "complete", seed, 0.0, dataset="avmnist")
        doc.update(task="classification", oracle={},
                   metrics={"test": {"acc": acc, "f1_weighted": acc - 0.02}})
        files.append(_write(tmp_path / f"c{seed}.json", doc))
    runs = load_runs(files)
    s = summarize(runs)
    assert [c for c in s.columns if c.endswith("_mean")] == ["acc_mean", "f1_weighted_mean"]
    assert s["acc_mean"].item() == pytest.approx(0.72)
    assert s["acc_std"].item() == pytest.approx(math.sqrt(0.0008))
    plot_study(runs, tmp_path / "cls")
    assert (tmp_path / "cls.png").stat().st_size > 0
