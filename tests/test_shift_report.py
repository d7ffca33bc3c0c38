"""The shift table: deltas against source only, and runs that read target labels marked."""

from __future__ import annotations

import json

import pytest

from mmrepro.report import add_baseline_delta, load_runs, summarize, write_table


def _run(tmp_path, method, seed, mae, labels=False):
    doc = {"study": "shift", "dataset": "synth", "method": method, "setting": "target_all", "seed": seed,
           "task": "regression", "backbone": "casp_late", "trainable_params": 0, "target_labels_used": labels,
           "metrics": {"test": {"mae": mae, "corr": 0.5}}}
    path = tmp_path / f"{method}{seed}.json"
    path.write_text(json.dumps(doc))
    return path


def test_delta_is_the_mean_paired_difference_and_label_use_is_marked(tmp_path):
    paths = [_run(tmp_path, "source_only", 0, 1.0), _run(tmp_path, "source_only", 1, 2.0),
             _run(tmp_path, "casp", 0, 0.7), _run(tmp_path, "casp", 1, 1.9, labels=True)]
    runs = load_runs(paths)
    assert set(runs["method"]) == {"source_only", "casp", "casp [target labels]"}
    paths[3] = _run(tmp_path, "casp", 1, 1.9)
    runs = load_runs(paths)
    table = add_baseline_delta(summarize(runs), runs)
    deltas = dict(zip(table["method"], table["mae_delta"]))
    assert deltas["source_only"] == pytest.approx(0.0) and deltas["casp"] == pytest.approx(-0.2)
    write_table(table, tmp_path / "shift")
    assert "MAE Δ source only" in (tmp_path / "shift.md").read_text()


def test_no_baseline_leaves_the_summary_alone(tmp_path):
    runs = load_runs([_run(tmp_path, "casp", 0, 0.7)])
    summary = summarize(runs)
    assert add_baseline_delta(summary, runs) is summary
