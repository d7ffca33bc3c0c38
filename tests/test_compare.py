"""``mmrepro compare``: the tables from the MLflow store agree with the tables from the files."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO, balance_spec
from mmrepro.cli import main
from mmrepro.tracking import RunTracker, init_store

REFERENCE = REPO / "config" / "reference" / "balance.csv"
MAE = {("joint", 0): 0.61, ("joint", 1): 0.65, ("cggm", 0): 0.55, ("cggm", 1): 0.52}


def _summary(method: str, seed: int) -> dict:
    test = {"mae": MAE[(method, seed)], "corr": 0.5 + seed / 10, "acc2_has0": 0.7, "f1_has0": 0.7,
            "acc2_non0": 0.71, "f1_non0": 0.69, "acc7": 0.3 - seed / 100}
    return {"study": "balance", "dataset": "mosi_mult", "method": method, "setting": "complete", "seed": seed,
            "task": "regression", "backbone": "late", "best_epoch": 3, "trainable_params": 100 + seed,
            "backbone_params": 400, "total_params": 500, "metrics": {"test": test, "valid": {**test, "mae": 0.4}},
            "oracle": {"test": {"mae": 0.2, "corr": 0.9, "acc7": 0.6}}}


def _spec(doc: dict):
    """The run spec of a summary's run (what a job logs its parameters and tags from)."""
    return balance_spec(**{k: doc[k] for k in ("study", "dataset", "method", "setting", "seed")})


def _make_store(tmp_path: Path) -> tuple[str, list[Path]]:
    """Each run logged to MLflow as the jobs do, and its metrics.json written beside."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    init_store(uri, ["balance"], tmp_path / "artifacts")
    files = []
    for (method, seed) in MAE:
        doc = _summary(method, seed)
        with RunTracker(uri, "balance", _spec(doc), threads=1) as run:
            run.log_metrics({"train_loss": 1.0, "valid_loss": 0.9}, step=1)
            run.log_summary(doc)
        path = tmp_path / "results" / method / f"seed{seed}" / "metrics.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(doc))
        files.append(path)
    with RunTracker(uri, "balance", _spec({**_summary("joint", 0), "seed": 9}), threads=1):
        pass  # a run that logged no summary (an unfinished job's kind): not a table row
    return uri, files


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[str, list[Path]]:
    return _make_store(tmp_path_factory.mktemp("store"))


def _tables(tmp_path: Path, uri: str, files: list[Path], *filter_: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    assert main(["report", "--table", str(tmp_path / "files"), "--plot", str(tmp_path / "plot"),
                 "--reference", str(REFERENCE), *map(str, files)]) == 0
    assert main(["compare", "--experiment", "balance", "--uri", uri, "--table", str(tmp_path / "mlflow"),
                 "--reference", str(REFERENCE), *(["--filter", *filter_] if filter_ else [])]) == 0
    return (pd.read_csv(tmp_path / "files.csv", keep_default_na=False),
            pd.read_csv(tmp_path / "mlflow.csv", keep_default_na=False))


def test_compare_writes_the_same_table_as_the_files(store, tmp_path):
    uri, files = store
    from_files, from_mlflow = _tables(tmp_path, uri, files)
    pd.testing.assert_frame_equal(from_mlflow, from_files, rtol=1e-9)
    assert (tmp_path / "mlflow.md").read_text(encoding="utf-8") == (tmp_path / "files.md").read_text(encoding="utf-8")
    assert set(from_files["method"]) == {"joint", "cggm"} and "mae_paper" in from_files  # not trivially empty


def test_any_filter_of_runs_matches_the_same_files(store, tmp_path):
    uri, files = store
    cggm = [f for f in files if f.parent.parent.name == "cggm"]
    from_files, from_mlflow = _tables(tmp_path, uri, cggm, "tags.method = 'cggm'")
    pd.testing.assert_frame_equal(from_mlflow, from_files, rtol=1e-9)
    assert set(from_mlflow.loc[from_mlflow["n"] > 0, "method"]) == {"cggm"}  # joint only as a paper "not run" row


def test_a_rerun_job_counts_once_with_its_latest_values(tmp_path):
    uri, files = _make_store(tmp_path / "store")
    doc = {**_summary("cggm", 1), "metrics": {"test": {**_summary("cggm", 1)["metrics"]["test"], "mae": 0.5}}}
    with RunTracker(uri, "balance", _spec(doc), threads=1) as run:
        run.log_summary(doc)
    files[-1].write_text(json.dumps(doc))
    from_files, from_mlflow = _tables(tmp_path, uri, files)
    pd.testing.assert_frame_equal(from_mlflow, from_files, rtol=1e-9)
    ours = from_mlflow[(from_mlflow["method"] == "cggm") & (from_mlflow["dataset"] == "mosi_mult")]
    assert ours["n"].item() == 2 and float(ours["mae_mean"].item()) == pytest.approx((MAE[("cggm", 0)] + 0.5) / 2)
