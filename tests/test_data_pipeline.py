"""The data half of the real Snakemake DAG: fetch (download or wait for a manual one) -> verify -> convert.

Raw files are tiny pickles in the MulT layout, served from ``file://`` URLs; the DAG is the
project's own Snakefile with a config naming them under a temporary ``data_root``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO
from test_real_data import dump

SNAKEFILE = REPO / "workflow" / "Snakefile"


def mult_pickle(path: Path) -> Path:
    """A tiny MulT sentiment pickle (``mosi_data.pkl`` layout)."""
    rng = np.random.default_rng(0)
    data = {split: {"text": rng.standard_normal((n, 4, 6)), "audio": rng.standard_normal((n, 4, 5)),
                    "vision": rng.standard_normal((n, 4, 3)),
                    "labels": rng.uniform(-3, 3, (n, 1, 1)).astype(np.float32),
                    "id": np.array([[f"v{split}{i}".encode(), b"0", b"1"] for i in range(n)])}
            for split, n in (("train", 6), ("valid", 3), ("test", 3))}
    return dump(data, path)


def config(tmp: Path, datasets: dict) -> dict:
    return {"results": "out", "data_root": str(tmp / "raw"), "datasets": datasets,
            "studies": {"balance": {"datasets": list(datasets), "methods": ["joint"],
                                    "settings": {"complete": {"type": "complete"}}}}}


def snakemake(tmp: Path, cfg: dict, *targets: str) -> subprocess.CompletedProcess:
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--directory", str(tmp),
                           "--configfile", str(tmp / "config.yaml"), "--cores", "1", *targets],
                          capture_output=True, text=True, env=env, timeout=300)


def test_download_verify_convert_through_the_dag(tmp_path):
    source = mult_pickle(tmp_path / "server" / "mosi_data.pkl")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    cfg = config(tmp_path, {"mosi": {"loader": "mult", "path": "MulT/mosi_data.pkl", "task": "sentiment",
                                     "source": {"url": source.as_uri(), "sha256": digest}}})
    done = snakemake(tmp_path, cfg, "out/data/mosi/manifest.json")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    raw = tmp_path / "raw" / "MulT" / "mosi_data.pkl"
    assert raw.read_bytes() == source.read_bytes()
    manifest = json.loads((tmp_path / "out" / "data" / "mosi" / "manifest.json").read_text())
    assert manifest["provenance"]["raw_check"]["checksum"] == "published"
    assert manifest["provenance"]["sha256"] == digest
    assert manifest["splits"]["train"]["arrays"]["x/audio"]["shape"] == [6, 4, 5]


def test_a_wrong_published_checksum_stops_before_conversion(tmp_path):
    source = mult_pickle(tmp_path / "server" / "mosi_data.pkl")
    cfg = config(tmp_path, {"mosi": {"loader": "mult", "path": "MulT/mosi_data.pkl", "task": "sentiment",
                                     "source": {"url": source.as_uri(), "sha256": "0" * 64}}})
    done = snakemake(tmp_path, cfg, "out/data/mosi/manifest.json")
    assert done.returncode != 0
    assert "checksum mismatch" in (done.stdout + done.stderr).lower()
    assert not (tmp_path / "raw" / "MulT" / "mosi_data.pkl").exists()
    assert (tmp_path / "raw" / "MulT" / "mosi_data.pkl.bad").exists(), "the failed download is kept for inspection"
    assert not (tmp_path / "out" / "data" / "mosi").exists()


def test_gated_data_prints_where_to_put_it_then_proceeds_once_there(tmp_path):
    cfg = config(tmp_path, {"iemocap": {"loader": "mult", "path": "MulT/iemocap_data.pkl", "task": "sentiment",
                                        "source": {"gated": True, "instructions": "Sign the USC SAIL form."}}})
    done = snakemake(tmp_path, cfg, "out/data/iemocap/manifest.json")
    assert done.returncode != 0
    said = done.stdout + done.stderr
    expected = tmp_path / "raw" / "MulT" / "iemocap_data.pkl"
    assert "Sign the USC SAIL form." in said and str(expected) in said
    assert not expected.exists() and not (tmp_path / "out" / "data" / "iemocap").exists()

    mult_pickle(expected)  # the user downloads it by hand
    done = snakemake(tmp_path, cfg, "out/data/iemocap/manifest.json")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    recorded = json.loads((tmp_path / "raw" / "checksums.json").read_text())
    assert list(recorded.values()) == [hashlib.sha256(expected.read_bytes()).hexdigest()]

    expected.write_bytes(expected.read_bytes()[:-10])  # the file changes after it was recorded
    done = snakemake(tmp_path, cfg, "out/data/iemocap/manifest.json", "--forcerun", "make_data")
    assert done.returncode != 0
    assert "checksum mismatch" in (done.stdout + done.stderr).lower()
    assert expected.exists(), "a file failing its recorded checksum is never deleted"


@pytest.fixture(scope="module")
def paper_plan() -> str:
    done = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile",
                           "config/paper.yaml"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_paper_config_plans_every_grid_with_fetches_first(paper_plan):
    paper = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    used = {d for study in paper["studies"].values() for d in study["datasets"]}
    plan = paper_plan.replace("localrule", "rule")
    for dataset in used:  # datasets reading one raw file share its fetch rule (named after one of them)
        sharing = {d for d, entry in paper["datasets"].items() if entry.get("path") == paper["datasets"][dataset].get("path")}
        assert any(f"rule fetch_{d}:" in plan for d in sharing), dataset
        assert f"results/data/{dataset}/manifest.json" in paper_plan
    for study in paper["studies"]:
        assert f"results/tables/{study}.md" in paper_plan
