"""The papers' numbers beside ours: config/reference/*.csv through names.yaml into the tables.

Every paper number a test compares with is read from the CSV in the test, never typed.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO
from mmrepro.report import load_reference, load_runs, summarize, write_table
from mmrepro.report.reference import CSV_COLUMNS
from mmrepro.report.tables import write_paper_table

REF = REPO / "config" / "reference"
NAMES = REF / "names.yaml"
STUDIES = ("balance", "missing", "shift", "peft")


def _paper_rows(study: str, **where: str) -> list[dict[str, str]]:
    with open(REF / f"{study}.csv", newline="", encoding="utf-8") as fh:
        return [r for r in csv.DictReader(fh) if all(r[k] == v for k, v in where.items())]


def _doc(dataset, method, setting, seed, metrics, *, study="balance", task="classification"):
    return {"study": study, "dataset": dataset, "method": method, "setting": setting, "seed": seed, "task": task,
            "backbone": "late", "metrics": {"test": metrics}, "oracle": {},
            "trainable_params": 250 * (1 + (method == "joint")), "backbone_params": 1000, "total_params": 1000}


def _runs(tmp_path: Path, docs: list[dict]) -> pd.DataFrame:
    paths = []
    for i, doc in enumerate(docs):
        path = tmp_path / "runs" / f"{i}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc))
        paths.append(path)
    return load_runs(paths)


@pytest.mark.parametrize("study", STUDIES)
def test_every_reference_row_maps_to_our_names(study):
    ref = load_reference(REF / f"{study}.csv", NAMES, study)
    rows = _paper_rows(study)
    assert len(ref.frame) == len(rows)
    assert set(ref.frame["scale"]) <= {1.0, 100.0}
    assert ref.frame["setting"].str.fullmatch(r"[A-Za-z0-9_.;= -]+").all()
    if not rows:
        assert ref.absent  # the table says why there is no paper column


def test_the_copies_keep_the_specs_columns_and_values():
    specs = REPO.parent.parent / "shared" / "specs" / "reference"
    for ours, theirs in (("balance", "cggm"), ("missing", "mplmm"), ("shift", "casp")):
        with open(REF / f"{ours}.csv", newline="", encoding="utf-8") as fh:
            assert tuple(next(csv.reader(fh))) == CSV_COLUMNS
        if specs.is_dir():
            assert (REF / f"{ours}.csv").read_text() == (specs / f"{theirs}.csv").read_text()


def test_paper_names_become_ours_in_the_papers_units():
    ref = load_reference(REF / "balance.csv", NAMES, "balance").frame.set_index(["dataset", "setting", "method",
                                                                                  "metric"])
    food = _paper_rows("balance", dataset="food101", metric="Acc")[0]
    row = ref.loc[("food101", "complete", food["method"], "acc")]
    assert row["value"] == pytest.approx(float(food["value"]) / 100)  # % -> our fraction
    assert row["printed"] == food["value"] and row["scale"] == 100
    mosi = _paper_rows("balance", dataset="mosi", metric="MAE")[0]
    assert ref.loc[("mosi_mult", "complete", "cggm", "mae"), "value"] == pytest.approx(float(mosi["value"]))
    brats = _paper_rows("balance", dataset="brats2021", metric="Dice-Avg", method="joint")[0]
    assert ref.loc[("brats2021", "complete_volumes", "joint", "dice_mean"), "printed"] == brats["value"]


def test_unmapped_metric_is_an_error_naming_the_line(tmp_path):
    bad = tmp_path / "balance.csv"
    bad.write_text(",".join(CSV_COLUMNS) + "\nP,T,food101,test,cggm,CGGM,Top-5,1.0,primary: paper text,\n")
    with pytest.raises(ValueError, match=r"balance\.csv:2.*Top-5"):
        load_reference(bad, NAMES, "balance")


def test_cells_show_ours_the_paper_and_the_difference_with_provenance(tmp_path):
    """Food-101 CGGM is run (two seeds), everything else the paper has is not run."""
    food = _paper_rows("balance", dataset="food101", method="cggm", metric="Acc")[0]
    paper = float(food["value"])
    accs = [0.80, 0.84]
    runs = _runs(tmp_path, [_doc("food101", "cggm", "complete", s, {"acc": a, "f1_weighted": a})
                            for s, a in enumerate(accs)])
    ref = load_reference(REF / "balance.csv", NAMES, "balance")
    write_table(summarize(runs, reference=ref), tmp_path / "balance")
    md = (tmp_path / "balance.md").read_text(encoding="utf-8")
    header = next(line for line in md.splitlines() if line.startswith("|"))
    assert "| Acc % ↑ | Acc paper | Acc Δ paper |" in header

    ours = 100 * sum(accs) / 2
    row = next(line for line in md.splitlines() if line.startswith("| cggm |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    decimals = len(food["value"].split(".")[1])
    at = header.strip("|").split("|").index(" Acc % ↑ ")
    assert cells[at] == f"{ours:.{decimals}f}±{100 * math.sqrt(0.0008):.{decimals}f}"
    mark = cells[at + 1][len(food["value"]):]
    assert cells[at + 1].startswith(food["value"]) and mark  # secondary: marked
    assert cells[at + 2] == f"{ours - paper:+.{decimals}f}"
    assert f"{mark} {food['provenance']}" in md  # the footnote names the provenance

    # Cells the paper has and we did not run: in the paper's own table, never beside ours.
    assert "brats2021" not in md and "not run" not in md
    write_paper_table(summarize(runs, reference=ref), tmp_path / "paper")
    paper_md = (tmp_path / "paper.md").read_text(encoding="utf-8")
    brats = paper_md.split("### brats2021")[1]
    joint = next(line for line in brats.splitlines() if line.startswith("| joint |"))
    assert f"| {_paper_rows('balance', dataset='brats2021', method='joint')[0]['value']}" in joint
    assert "food101" not in paper_md  # its one cell has a run
    csv_out = pd.read_csv(tmp_path / "balance.csv")
    not_run = csv_out[csv_out["n"] == 0]
    assert len(not_run) == len({(r["dataset"], r["method"]) for r in _paper_rows("balance")}) - 1
    assert not_run.filter(regex="_mean$").isna().all().all()
    assert csv_out.loc[csv_out["n"] == 2, "acc_paper"].item() == pytest.approx(paper / 100)
    assert csv_out.loc[csv_out["n"] == 2, "acc_diff"].item() == pytest.approx(ours / 100 - paper / 100)
    tex = (tmp_path / "balance.tex").read_text(encoding="utf-8")
    assert r"$^{\dag}$" in tex and r"Acc $\Delta$ paper" in tex


def test_values_from_the_paper_itself_carry_no_mark(tmp_path):
    rows = _paper_rows("missing", dataset="sims", condition="available=t", method="lower_bound")
    acc = next(r for r in rows if r["metric"] == "ACC")
    assert acc["provenance"].startswith("primary") and not acc["note"]
    runs = _runs(tmp_path, [_doc("sims", "lower_bound", "text", s, {"acc2": 0.7, "f1": 0.7, "mae": 0.5},
                                 study="missing", task="sims_regression") for s in (0, 1)])
    write_table(summarize(runs, reference=load_reference(REF / "missing.csv", NAMES, "missing")), tmp_path / "m")
    md = (tmp_path / "m.md").read_text(encoding="utf-8")
    row = next(line for line in md.splitlines() if line.startswith("| lower_bound |"))
    assert f"| {acc['value']} |" in row  # printed as is, no mark
    assert "| Acc-2 % ↑ | Acc-2 paper |" in next(line for line in md.splitlines() if line.startswith("|"))


def test_peft_table_says_there_is_no_paper_number_and_shows_parameter_shares(tmp_path):
    runs = _runs(tmp_path, [_doc("synth", m, "complete", s, {"acc": 0.5, "f1_weighted": 0.5}, study="peft")
                            for m in ("joint", "wander") for s in (0, 1)])
    ref = load_reference(REF / "peft.csv", NAMES, "peft")
    summary = summarize(runs, reference=ref)
    assert summary.set_index("method")["trainable_share"].to_dict() == {"joint": 0.5, "wander": 0.25}
    write_table(summary, tmp_path / "peft")
    md = (tmp_path / "peft.md").read_text(encoding="utf-8")
    assert "| method | params |" in md
    assert "| 250 (25.0 %) |" in md and "| 500 (50.0 %) |" in md
    assert ref.absent in md and "paper" not in next(line for line in md.splitlines() if line.startswith("|"))
