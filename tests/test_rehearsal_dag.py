"""The tiny rehearsal through the real Snakemake DAG, cut to fit CI: paper.yaml + rehearsal.yaml on one
dataset of each loader, with every (study, method) pair of the paper grid run at least once (fetch ->
stand-in -> convert -> backbones -> train/adapt -> reports -> MLflow), from an empty folder. The whole
rehearsal (every job of the grid) is `snakemake --cores all --configfile config/paper.yaml
config/rehearsal.yaml` (docs/rehearsal.md); this test is its sample.

The cut is ``config/rehearsal_cut.yaml`` (what it cuts and why: its comments): the "run what you have"
path, every model cut to one layer (the real models are the whole rehearsal's); what is left is the
fixed cost of 80 jobs (about 600 CPU-seconds, docs/benchmarks.md#the-tiny-rehearsal). Marked slow as a
label only: CI runs the whole suite, slow included.
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
#: one dataset per loader, every model one layer of width 8-10 (the fixed cost of ~80 jobs is most of the CI
#: budget); benchmarks/slurm_rehearsal.sh --cut runs the same file through SLURM
CUT_FILE = REPO / "config" / "rehearsal_cut.yaml"
CUT = yaml.safe_load(CUT_FILE.read_text())
# config.yaml too: the Snakefile's own configfile is relative to --directory
LAYERS = [REPO / "config" / "config.yaml", REPO / "config" / "paper.yaml", REPO / "config" / "rehearsal.yaml"]


def _config(*layers: Path, extra: dict | None = None) -> dict:
    config: dict = {}
    for path in layers:
        merge_config(config, yaml.safe_load(path.read_text()))
    return validate_config(merge_config(config, extra or {}), load_schema(SCHEMA))


@pytest.mark.slow
def test_the_tiny_rehearsal_runs_every_study_method_pair_and_each_loader_through_the_dag(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--directory", str(tmp_path),
                           "--cores", "2", "--configfile", *map(str, LAYERS), str(CUT_FILE)],
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
