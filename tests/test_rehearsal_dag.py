"""The tiny rehearsal through the real Snakemake DAG, cut to fit CI: paper.yaml + rehearsal.yaml on one
dataset of each loader, with every (study, method) pair of the paper grid run at least once (fetch ->
stand-in -> convert -> backbones -> train/adapt -> reports -> MLflow), from an empty folder. The whole
rehearsal (every job of the grid) is `snakemake --cores all --configfile config/paper.yaml
config/rehearsal.yaml` (docs/rehearsal.md); this test is its sample.

The cut itself is the "run what you have" path: each study lists a subset of its datasets and the
entries naming the others are skipped with a note. Settings are cut only where a study repeats a
method over settings (the lower bound's modality sets, the shift pairs), and shift keeps one backbone.
Every model is cut to one layer of width 8-10 and BraTS's ResNet-101 branches to ResNet-18 at width 8 (the
real models are the whole rehearsal's): what is left is the fixed cost of 80 jobs (about 600 CPU-seconds,
docs/benchmarks.md#the-tiny-rehearsal). Marked slow as a label only: CI runs the whole suite, slow included.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from conftest import REPO
from mmrepro.config import load_schema, merge_config, study_grid, validate_config

SNAKEFILE = REPO / "workflow" / "Snakefile"
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
TITLE = "REHEARSAL on random stand-in data (tiny): not a result"
#: one dataset per loader: iemocap_h5 and brats (balance), mult (missing), food101 (peft), mmsa (shift);
#: every model one layer of width 8-10 (the fixed cost of ~80 jobs is most of the CI budget)
ONE_LAYER = {"d_model": 10, "layers": 1, "fusion_layers": 1}   # cggm_msa and mplmm_mult: 5 heads
CUT = {
    "train": {"max_steps": 1},
    "studies": {
        "balance": {"datasets": ["iemocap_mmin", "brats2021"], "model": ONE_LAYER,
                    "settings": {"complete_volumes": {"methods": ["joint"]}},
                    "per_dataset": {"iemocap_mmin": {"model": ONE_LAYER},
                                    "brats2021": {"model": {"resnet": 18, "resnet_width": 8, "d_model": 16}}}},
        "missing": {"datasets": ["mosei_mult"], "model": ONE_LAYER,
                    "settings": {s: {"datasets": []} for s in ("lb_a", "lb_v", "lb_ta", "lb_tv", "lb_av")}},
        "peft": {"datasets": ["food101"], "model": {"d_model": 8, "layers": 1}},   # casp_late: 8 heads
        "shift": {"datasets": ["sims_casp"], "backbones": None,   # one backbone: casp_late, the study's model
                  "model": {"d_model": 8, "layers": 1},
                  "settings": {"to_mosi": {"datasets": []}, "to_mosei": {"datasets": []}}},
    },
}
# config.yaml too: the Snakefile's own configfile is relative to --directory
LAYERS = [REPO / "config" / "config.yaml", REPO / "config" / "paper.yaml", REPO / "config" / "rehearsal.yaml"]


def _config(*layers: Path, extra: dict | None = None) -> dict:
    config: dict = {}
    for path in layers:
        merge_config(config, yaml.safe_load(path.read_text()))
    return validate_config(merge_config(config, extra or {}), load_schema(SCHEMA))


@pytest.mark.slow
def test_the_tiny_rehearsal_runs_every_study_method_pair_and_each_loader_through_the_dag(tmp_path):
    (tmp_path / "cut.yaml").write_text(yaml.safe_dump(CUT))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--directory", str(tmp_path),
                           "--cores", "2", "--configfile", *map(str, LAYERS), str(tmp_path / "cut.yaml")],
                          capture_output=True, text=True, env={**env, "PYTHONUNBUFFERED": "1"},
                          timeout=3600)   # a guard against a hang, not a timing: a loaded machine takes 15-25 min
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    out = tmp_path / "results_rehearsal"
    assert not (tmp_path / "results").exists()
    assert "note: studies.balance.per_dataset.food101 skipped: the study does not run 'food101'" in done.stderr

    paper, cut = _config(*LAYERS), _config(*LAYERS, extra=CUT)
    for study in paper["studies"]:   # every (study, method) pair of the paper grid ran at least once
        ran = {json.loads((out / f).read_text())["method"]
               for f in _metrics(out, study, cut)}
        assert ran == set(paper["studies"][study]["methods"]), study
    loaders = {cut["datasets"][d]["loader"] for d in os.listdir(out / "data")}
    assert loaders == {"mmsa", "mult", "iemocap_h5", "food101", "brats"}
    fetch = (out / "logs" / "fetch" / "sims_casp.log").read_text()
    assert "wrote a random tiny stand-in" in fetch and "the stand-in's own SHA-256" in fetch

    for table in ("balance", "missing", "shift", "peft", "missing_cases", "balance_cggm"):   # titled as rehearsals
        assert (out / "tables" / f"{table}.md").read_text().startswith(f"**{TITLE}**"), table
    assert (out / "tables" / "shift.csv").read_text().startswith(f"# {TITLE}\n")
    assert all((out / "plots" / f"{s}_curves.png").stat().st_size > 0 for s in paper["studies"])
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out.resolve()}/mlflow.db")
    for name in ("balance", "missing", "shift", "peft", "backbones"):
        runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
        assert runs and all(r.data.tags.get("rehearsal") == "tiny" for r in runs), name


def _metrics(out: Path, study: str, config: dict) -> list[str]:
    """The metrics.json files of the study's runs under ``out`` (each must exist)."""
    files = []
    for run in study_grid(config, study):
        parts = [study, run["dataset"], *([run["backbone"]] if "backbone" in run else []), run["method"],
                 run["setting"], f"seed{run['seed']}", "metrics.json"]
        assert (out.joinpath(*parts)).is_file(), parts
        files.append(os.path.join(*parts))
    return files
