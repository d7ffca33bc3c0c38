"""The study tables in the papers' layout, built from small hand-made run records (no DAG).

Rows are methods, columns datasets x metrics; only the datasets run (the paper's other cells in a
separate table); a metric equal to another on every run and seed shown once, decided from the
values; one unit per metric; the best per column marked (lower is better for MAE); the oracle as
a row; one trainable share and one headline in every output.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from mmrepro.report import load_runs, summarize, write_table
from mmrepro.report.missing import case_table, write_case_table
from mmrepro.report.render import KINDS, ValueKind, _signed, study_table
from mmrepro.report.tables import add_baseline_delta, split_rows, write_paper_table


def _doc(dataset, method, seed, test, *, task="regression", setting="complete", study="balance", oracle=None,
         trainable=1000, backbone=2000, **extra):
    return {"study": study, "dataset": dataset, "method": method, "setting": setting, "seed": seed, "task": task,
            "backbone": "late", "metrics": {"test": test, **extra.pop("splits", {})},
            "oracle": {"test": oracle} if oracle else {}, "trainable_params": trainable, "backbone_params": backbone,
            "total_params": backbone + 500, **extra}


def _write(tmp_path: Path, docs: list[dict]) -> list[Path]:
    paths = []
    for i, doc in enumerate(docs):
        path = tmp_path / "runs" / f"{i}" / "metrics.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(doc))
        paths.append(path)
    return paths


def _regression(mae, *, has0=0.70, non0=None, corr=0.5):
    non0 = has0 if non0 is None else non0
    return {"mae": mae, "corr": corr, "acc2_has0": has0, "f1_has0": has0 - 0.01, "acc2_non0": non0,
            "f1_non0": non0 - 0.01, "acc7": 0.3}


def _md_table(md: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in md.splitlines() if line.startswith("|")]


@pytest.fixture
def two_datasets(tmp_path):
    """synth: acc2_non0 equals acc2_has0 on every run and seed; other: they differ on one seed."""
    docs = []
    for seed in (0, 1):
        for method, mae in (("joint", 0.80), ("cggm", 0.70)):
            docs.append(_doc("synth", method, seed, _regression(mae + 0.01 * seed, has0=0.71 + 0.01 * seed),
                             oracle=_regression(0.2, has0=0.95)))
            docs.append(_doc("other", method, seed, _regression(mae + 0.1, has0=0.6, non0=0.6 + 0.05 * seed)))
    return load_runs(_write(tmp_path, docs))


def test_rows_are_methods_and_columns_datasets_by_metric_in_one_unit(two_datasets, tmp_path):
    write_table(summarize(two_datasets), tmp_path / "t")
    rows = _md_table((tmp_path / "t.md").read_text(encoding="utf-8"))
    header, body = rows[0], rows[2:]
    assert [r[0] for r in body] == ["joint", "cggm", "oracle (noise-free)"]  # one setting: no setting column
    assert header[:3] == ["method", "other params", "other MAE ↓"]
    assert "synth MAE ↓" in header and "synth Acc-2 has0 % ↑" in header
    assert not any("oracle" in h for h in header)  # the oracle is a row, not a column per metric
    # accuracy in % with one decimal, MAE as computed, both "mean±std"
    joint = dict(zip(header, body[0]))
    assert joint["synth Acc-2 has0 % ↑"] == "71.5±0.7"
    assert joint["synth MAE ↓"].startswith("0.805±")
    assert joint["synth params"] == "1,000 (50.0 %)"
    oracle = dict(zip(header, body[2]))
    assert oracle["synth MAE ↓"] == "0.200" and oracle["synth Acc-2 has0 % ↑"] == "95.0" and oracle["other MAE ↓"] == ""


def test_a_metric_equal_on_every_run_and_seed_is_shown_once_decided_from_the_values(two_datasets, tmp_path):
    summary = summarize(two_datasets)
    assert summary.attrs["same"]["synth"] == {"acc2_non0": "acc2_has0", "f1_non0": "f1_has0"}
    assert "acc2_non0" not in summary.attrs["same"].get("other", {})  # differs on seed 1 there
    write_table(summary, tmp_path / "t")
    md = (tmp_path / "t.md").read_text(encoding="utf-8")
    header = _md_table(md)[0]
    assert "synth Acc-2 non0 % ↑" not in header and "other Acc-2 non0 % ↑" in header
    assert "synth: acc2_non0 = acc2_has0" in md
    assert "acc2_non0_mean" in (tmp_path / "t.csv").read_text()  # the CSV keeps every metric


def test_the_best_per_column_is_bold_lower_mae_higher_accuracy_and_no_bold_on_ties(two_datasets, tmp_path):
    write_table(summarize(two_datasets), tmp_path / "t")
    rows = _md_table((tmp_path / "t.md").read_text(encoding="utf-8"))
    cells = {r[0]: dict(zip(rows[0], r)) for r in rows[2:]}
    assert cells["cggm"]["synth MAE ↓"].startswith("**0.705±") and not cells["joint"]["synth MAE ↓"].startswith("**")
    assert "**" not in cells["joint"]["synth Acc-7 % ↑"] + cells["cggm"]["synth Acc-7 % ↑"]  # all tied
    tex = (tmp_path / "t.tex").read_text()
    assert r"\textbf{0.705$\pm$" in tex and tex.count(r"\toprule") == 1 and r"\cmidrule(lr)" in tex
    assert "multicolumn" in tex and r"MAE $\downarrow$" in tex
    spec = tex.split(r"\begin{tabular}{")[1].split("}")[0]
    body = tex.split(r"\midrule")[1].split(r"\bottomrule")[0]
    rows = [line for line in body.splitlines() if line.endswith(r"\\")]
    assert rows and all(line.count(" & ") + 1 == len(spec) for line in rows)  # every row fills the columns
    groups = tex.split(r"\toprule")[1].splitlines()[1]
    assert sum(int(w) for w in re.findall(r"\\multicolumn\{(\d+)\}", groups)) + groups.count(" & ") + 1 \
        - len(re.findall(r"\\multicolumn", groups)) == len(spec)


def test_a_higher_is_better_column_marks_the_highest(tmp_path):
    docs = [_doc("synth", m, s, _regression(0.5, corr=c)) for s in (0, 1) for m, c in (("a", 0.4), ("b", 0.6))]
    write_table(summarize(load_runs(_write(tmp_path, docs))), tmp_path / "t")
    rows = _md_table((tmp_path / "t.md").read_text(encoding="utf-8"))
    cells = {r[0]: dict(zip(rows[0], r)) for r in rows[2:]}
    assert cells["b"]["Corr ↑"].startswith("**0.600") and not cells["a"]["Corr ↑"].startswith("**")


def test_only_datasets_run_and_the_papers_other_cells_in_their_own_table(two_datasets, tmp_path):
    ref = pd.DataFrame({"dataset": ["synth", "mosi", "mosi"], "method": ["cggm", "cggm", "joint"],
                        "setting": ["complete"] * 3, "metric": ["mae", "mae", "mae"], "value": [0.65, 0.747, 0.81],
                        "printed": ["0.650", "0.747", "0.810"]})
    summary = summarize(two_datasets, reference=ref)
    write_table(summary, tmp_path / "t", paper_table="paper/t.md")
    write_paper_table(summary, tmp_path / "paper" / "t")
    md = (tmp_path / "t.md").read_text(encoding="utf-8")
    rows = _md_table(md)
    assert "mosi" not in "".join(rows[0]) and len(rows) == 2 + 3  # header, rule, two methods and the oracle
    cggm = dict(zip(rows[0], next(r for r in rows if r[0] == "cggm")))
    assert cggm["synth MAE paper"] == "0.650" and cggm["synth MAE Δ paper"] == "+0.055"
    assert "other MAE paper" not in rows[0]  # no paper cell for that dataset: no column
    assert "paper/t.md" in md
    paper = (tmp_path / "paper" / "t.md").read_text(encoding="utf-8")
    prows = _md_table(paper)
    assert [r[0] for r in prows[2:]] == ["cggm", "joint"] and prows[2][1] == "0.747"
    assert "synth" not in paper  # cells with a run stay in the study table


def test_a_new_value_kind_is_one_more_column_per_metric(two_datasets, monkeypatch):
    """Issue 24's paired difference to the reference row slots in as one KINDS entry."""
    summary = summarize(two_datasets)
    summary["mae_refdiff"] = [0.01 * i for i in range(len(summary))]
    monkeypatch.setattr("mmrepro.report.render.KINDS", (*KINDS, ValueKind("refdiff", "{m} Δ ref", _signed("refdiff"))))
    table = study_table(summary, summary.attrs["metrics"])
    assert "MAE Δ ref" in table.header and "Corr Δ ref" not in table.header  # only where a row has a value
    at = table.header.index("MAE Δ ref")
    assert [r.cells[at].text for r in table.blocks[0][:2]] == ["+0.000", "+0.010"]  # the first group: "other"


def test_shift_delta_and_several_settings_make_blocks(tmp_path):
    docs = [_doc("synth", m, s, {"mae": v + 0.01 * s, "corr": 0.5}, setting=st, study="shift", trainable=0)
            for s in (0, 1) for st, base in (("target_a", 1.0), ("target_b", 2.0))
            for m, v in (("source_only", base), ("casp", base - 0.2))]
    runs = load_runs(_write(tmp_path, docs))
    write_table(add_baseline_delta(summarize(runs), runs), tmp_path / "t")
    rows = _md_table((tmp_path / "t.md").read_text(encoding="utf-8"))
    assert rows[0][:2] == ["setting", "method"]
    assert [r[:2] for r in rows[2:]] == [["target_a", "source_only"], ["target_a", "casp"],
                                         ["target_b", "source_only"], ["target_b", "casp"]]
    delta = {tuple(r[:2]): dict(zip(rows[0], r))["MAE Δ source only"] for r in rows[2:]}
    assert delta[("target_b", "casp")] == "-0.200" and delta[("target_a", "source_only")] == "+0.000"
    assert rows[2][2] == "0"  # no share of nothing


def test_one_trainable_share_in_the_study_table_and_the_case_table(tmp_path):
    """The same MPLMM run showed 50.81 % of backbone in one table and 34.0 % in the other (trainable
    over total parameters): both now divide by the backbone's parameters."""
    cases = {f"test:available:{s}": {"acc": 0.5 + 0.1 * i} for i, s in enumerate(("text", "audio", "text.audio"))}
    docs = [_doc("synth", "mplmm", s, {"acc": 0.9}, task="classification", study="missing", setting="rate0.7",
                 trainable=7203, backbone=14177, splits={**cases, "test:avg": {"acc": 0.6}}) for s in (0, 1)]
    runs = load_runs(_write(tmp_path, docs))
    write_table(summarize(runs), tmp_path / "study")
    write_case_table(case_table(runs), tmp_path / "cases")
    share = f"7,203 ({100 * 7203 / 14177:.1f} %)"
    assert share in (tmp_path / "study.md").read_text(encoding="utf-8")
    assert share in (tmp_path / "cases.md").read_text(encoding="utf-8")


def test_the_headline_is_the_case_mean_where_a_run_has_cases_in_every_output(tmp_path):
    """A run's test split, its case mean and its rate sweep are three numbers; the study table, the
    study plot and the case table's avg all show the case mean."""
    docs = []
    for s in (0, 1):
        cases = {f"test:available:{m}": {"mae": 1.0 + 0.1 * i + 0.01 * s} for i, m in enumerate(("text", "audio"))}
        docs.append(_doc("synth", "mplmm", s, {"mae": 1.3}, study="missing", setting="rate0.7", oracle={"mae": 0.2},
                         splits={**cases, "test:avg": {"mae": 1.05 + 0.01 * s}, "test:rate:0.7": {"mae": 1.4}}))
        docs.append(_doc("synth", "joint", s, {"mae": 0.9}, study="missing", setting="complete"))  # no cases
    runs = load_runs(_write(tmp_path, docs))
    summary = summarize(runs).set_index("method")
    assert summary.loc["mplmm", "mae_mean"] == pytest.approx(1.055)
    assert summary.loc["mplmm", "mae_oracle"] == pytest.approx(0.2)  # the test split's oracle
    assert summary.loc["joint", "mae_mean"] == pytest.approx(0.9)
    cases = case_table(runs).set_index(["method", "case", "metric"])
    assert cases.loc[("mplmm", "avg", "mae"), "mean"] == pytest.approx(summary.loc["mplmm", "mae_mean"])
    headline = split_rows(runs, "headline")
    assert set(headline["split"]) == {"test", "test:avg"} and len(headline) == 4
    again = split_rows(headline, "headline")  # idempotent: the plot selects the headline of the headline
    assert again["oracle"].fillna(-1).tolist() == headline["oracle"].fillna(-1).tolist()
    write_table(summarize(runs), tmp_path / "t")
    assert "test:avg" in (tmp_path / "t.md").read_text(encoding="utf-8")  # the note says which


def test_default_sized_tables_fit_a_screen(tmp_path):
    """Three methods, one dataset, one setting (the default missing study's shape): at most 120
    characters a line, a handful of rows."""
    docs = [_doc("synth", m, s, _regression(1.030 + 0.004 * s), oracle=_regression(0.2), study="missing",
                 setting="rate0.7", trainable=7203, backbone=14177)
            for s in (0, 1) for m in ("mplmm", "modality_dropout", "modality_substitution")]
    write_table(summarize(load_runs(_write(tmp_path, docs))), tmp_path / "t")
    table = [line for line in (tmp_path / "t.md").read_text(encoding="utf-8").splitlines() if line.startswith("|")]
    assert len(table) == 2 + 3 + 1
    assert max(map(len, table)) <= 120, max(table, key=len)
