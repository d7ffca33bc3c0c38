"""The missing study's report: Table 1 layout (per available set + Avg, LB assembled from its
per-set models), trainable share, and the curve over the test missing rate."""

from __future__ import annotations

import csv
import json

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, balance_spec
from mmrepro.cli import main
from mmrepro.report.missing import case_table
from mmrepro.spec import DataSetting, MethodPlan

SETS = ["text", "audio", "vision", "text.audio", "text.vision", "audio.vision"]


def write(tmp_path, method, setting, seed, metrics, trainable=10, total=100, rate=0.7, params=None, dataset="synth"):
    path = tmp_path / dataset / method / setting / f"seed{seed}" / "metrics.json"
    path.parent.mkdir(parents=True)
    transform = "full_finetune" if method == "lower_bound" else "mplmm"
    (path.parent / "config.json").write_text(balance_spec(
        data_setting=DataSetting(type="available" if method == "lower_bound" else "missing", params={"rate": rate}),
        plan=MethodPlan(transform=transform, hook="joint", adapter="source_only"),
        method_params={transform: params or {}, "joint": {}, "source_only": {}}).to_json())
    path.write_text(json.dumps({"study": "missing", "dataset": dataset, "method": method, "setting": setting,
                                "seed": seed, "task": "classification", "label": "main", "backbone": "mplmm_mult",
                                "metrics": metrics, "trainable_params": trainable, "backbone_params": total,
                                "total_params": total}))
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
    assert "| mplmm | 7 (7.0 %) |" in md  # the share of the backbone, as in the study table
    assert (out / "rates.png").read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------------------------- report groups (IEMOCAP's four tasks)

EMOTIONS = ["iemocap_mmin_neutral", "iemocap_mmin_happy", "iemocap_mmin_sad", "iemocap_mmin_angry"]
GROUPS = {"iemocap": EMOTIONS}
REF = REPO / "config" / "reference"


def emotion_acc(task, case, seed):
    """A member's accuracy: seed effects differ between tasks, so the spread of the per-seed group
    mean differs from any mean of the members' spreads."""
    return 0.5 + 0.05 * task + 0.01 * case + 0.02 * seed * (task - 1.5)


def emotion_runs(tmp_path, skip=()):
    """mplmm on the four emotion tasks, three seeds; ``skip``: (task index, seed) runs left out."""
    paths = []
    for j, ds in enumerate(EMOTIONS):
        for seed in (0, 1, 2):
            if (j, seed) in skip:
                continue
            cases = {f"test:available:{s}": {"acc": emotion_acc(j, i, seed), "f1_weighted": 0.4}
                     for i, s in enumerate(SETS)}
            paths.append(write(tmp_path, "mplmm", "rate0.7", seed, {"test": {"acc": emotion_acc(j, 9, seed),
                                                                            "f1_weighted": 0.4}, **cases},
                               trainable=7, total=100, dataset=ds))
    return paths


def paper_cell(condition, metric="ACC", method="mplmm"):
    with open(REF / "missing.csv", newline="", encoding="utf-8") as fh:
        return next(r for r in csv.DictReader(fh) if (r["dataset"], r["condition"], r["method"], r["metric"])
                    == ("iemocap", condition, method, metric))


def md_rows(md, dataset, metric):
    """The Markdown block of one dataset and metric: {first cell: cells}, plus the header's cells."""
    block = md.split(f"### {dataset}: {metric}")[1].split("###")[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in block.splitlines() if line.startswith("|")]
    return rows[0], {r[0]: r for r in rows[2:]}


def test_group_row_is_the_mean_over_its_tasks_per_seed_then_over_seeds(tmp_path):
    from mmrepro.report import load_reference, load_runs
    from mmrepro.report.groups import add_groups, parse_groups

    runs = add_groups(load_runs(emotion_runs(tmp_path)), parse_groups(GROUPS))
    table = case_table(runs, load_reference(REF / "missing.csv", REF / "names.yaml", "missing"))
    acc = table[(table["metric"] == "acc") & (table["n"] > 0)].set_index(["dataset", "case"])
    per_seed = [np.mean([emotion_acc(j, 1, s) for j in range(4)]) for s in (0, 1, 2)]  # case 1: audio
    assert acc.loc[("iemocap", "audio"), "mean"] == pytest.approx(np.mean(per_seed))
    assert acc.loc[("iemocap", "audio"), "std"] == pytest.approx(np.std(per_seed, ddof=1))
    assert acc.loc[("iemocap", "audio"), "n"] == 3
    avg_seed = [np.mean([emotion_acc(j, i, s) for j in range(4) for i in range(6)]) for s in (0, 1, 2)]
    assert acc.loc[("iemocap", "avg"), "std"] == pytest.approx(np.std(avg_seed, ddof=1))
    assert acc.loc[("iemocap_mmin_sad", "audio"), "mean"] == pytest.approx(np.mean([emotion_acc(2, 1, s) for s in (0, 1, 2)]))
    # the paper's IEMOCAP cell sits beside the group's, our case named for its modality set
    at = paper_cell("available=at")
    assert acc.loc[("iemocap", "text.audio"), "paper_printed"] == at["value"]
    assert acc.loc[("iemocap", "text.audio"), "paper"] == pytest.approx(float(at["value"]) / 100)
    assert pd.isna(acc.loc[("iemocap_mmin_sad", "audio"), "paper"])  # the members have no paper cell

    # the study table (test split) has the group's row too
    from mmrepro.report import summarize
    summary = summarize(runs).set_index("dataset")
    assert summary.loc["iemocap", "acc_mean"] == pytest.approx(np.mean([emotion_acc(j, 9, s) for j in range(4) for s in range(3)]))
    assert summary.loc["iemocap", "acc_std"] == pytest.approx(
        np.std([np.mean([emotion_acc(j, 9, s) for j in range(4)]) for s in range(3)], ddof=1))


def test_missing_report_shows_the_group_beside_the_papers_iemocap_row(tmp_path):
    out = tmp_path / "out"
    assert main(["missing-report", "--table", str(out / "cases"), "--plot", str(out / "rates"),
                 "--reference", str(REF / "missing.csv"), "--groups", json.dumps(GROUPS),
                 *map(str, emotion_runs(tmp_path))]) == 0
    md = (out / "cases.md").read_text(encoding="utf-8")
    header, rows = md_rows(md, "iemocap", "Acc % ↑")
    ours, paper = rows["mplmm"], rows["mplmm (paper)"]
    per_seed = [np.mean([emotion_acc(j, 1, s) for j in range(4)]) for s in (0, 1, 2)]
    assert ours[header.index("audio")] == f"{100 * np.mean(per_seed):.2f}±{100 * np.std(per_seed, ddof=1):.2f}"
    a, at, avg = paper_cell("available=a"), paper_cell("available=at"), paper_cell("available=avg6")
    mark = paper[header.index("audio")].removeprefix(a["value"])
    assert mark and paper[header.index("text.audio")] == at["value"] + mark and paper[header.index("avg")] == avg["value"] + mark
    assert f"{mark} {a['note']}" in md  # the provenance note as footnote
    assert "lower_bound (paper)" in rows  # a method the paper reports and we did not run: its row alone
    assert "iemocap: report group, each cell the mean over iemocap_mmin_neutral" in md
    _, member = md_rows(md, "iemocap_mmin_sad", "Acc % ↑")
    assert "mplmm" in member and "mplmm (paper)" not in member  # members kept, no paper cell of their own


def test_a_seed_missing_for_one_task_makes_the_group_cell_incomplete(tmp_path):
    from mmrepro.report import load_runs
    from mmrepro.report.groups import add_groups, parse_groups
    from mmrepro.report.missing import write_case_table

    paths = emotion_runs(tmp_path, skip={(2, 1)})  # iemocap_mmin_sad lacks seed 1
    out = tmp_path / "out"
    write_case_table(case_table(add_groups(load_runs(paths), parse_groups(GROUPS))), out / "cases")
    table = pd.read_csv(out / "cases.csv")
    group = table[table["dataset"] == "iemocap"]
    assert group["incomplete"].all() and group["mean"].isna().all()  # never a mean over three tasks
    assert not table.loc[table["dataset"] == "iemocap_mmin_sad", "incomplete"].any()
    _, rows = md_rows((out / "cases.md").read_text(encoding="utf-8"), "iemocap", "Acc % ↑")
    assert rows["mplmm"][1:8] == ["incomplete"] * 7  # six cases and avg
    _, sad = md_rows((out / "cases.md").read_text(encoding="utf-8"), "iemocap_mmin_sad", "Acc % ↑")
    assert "incomplete" not in sad["mplmm"]

    # the study table marks it too (its writer, not the CLI: the CLI's plot costs a minute)
    from mmrepro.report import summarize, write_table
    write_table(summarize(add_groups(load_runs(paths), parse_groups(GROUPS))), out / "study")
    study = (out / "study.md").read_text(encoding="utf-8")
    header = next(line for line in study.splitlines() if line.startswith("|")).strip("|").split("|")
    row = next(line for line in study.splitlines() if line.startswith("| mplmm |")).strip("|").split("|")
    assert row[header.index(" iemocap Acc % ↑ ")].strip() == "incomplete"
    assert row[header.index(" iemocap_mmin_sad Acc % ↑ ")].strip() != "incomplete"
    assert "iemocap: report group" in study
