"""The rehearsal of the papers' grids (config/rehearsal.yaml over config/paper.yaml) and what it rests on:
the whole grid with one seed and one capped epoch on stand-ins, the fetch step writing a stand-in and
holding it to its own checksum, every report on stand-in runs titled as a rehearsal, the MLflow tag,
and a study's grid cut to the datasets a user holds. The DAG itself: tests/test_rehearsal_dag.py."""

from __future__ import annotations

import inspect
import json
import logging
import re
import threading
from dataclasses import replace
from pathlib import Path

import matplotlib
import pytest
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from conftest import REPO, SCHEMA, balance_spec  # noqa: E402
from mmrepro.cli import main  # noqa: E402
from mmrepro.config import (ConfigError, backbone_runs, backbone_spec, dataset_spec, load_schema,  # noqa: E402
                            merge_config, run_spec, study_grid, validate_config)
from mmrepro.data import build_store  # noqa: E402
from mmrepro.data.download import ChecksumMismatch  # noqa: E402
from mmrepro.data.standin import MANIFEST, Scale, generate  # noqa: E402
from mmrepro.data.standin.entry import with_own_checksum  # noqa: E402
from mmrepro.data.store import FeatureStore  # noqa: E402
from mmrepro.methods.registry import ADAPTERS  # noqa: E402
from mmrepro.report.marking import mark_figure, marked  # noqa: E402
from mmrepro.tracking import run_tags  # noqa: E402
from test_report import _doc, _write  # noqa: E402


def layered(*files: str, **override) -> dict:
    """config.yaml, then config/<files>, then ``override``, validated (defaults filled)."""
    config: dict = {}
    for name in ("config.yaml", *files):
        merge_config(config, yaml.safe_load((REPO / "config" / name).read_text()))
    return validate_config(merge_config(config, override), load_schema(SCHEMA))


def _cells(config: dict, study: str) -> set[tuple]:
    return {(r["dataset"], r.get("backbone"), r["method"], r["setting"]) for r in study_grid(config, study)}


def test_the_rehearsal_keeps_the_whole_grid_with_one_seed_one_capped_epoch_on_stand_ins():
    paper, rehearsal = layered("paper.yaml"), layered("paper.yaml", "rehearsal.yaml")
    assert (rehearsal["results"], rehearsal["seeds"], rehearsal["tune"]["trials"]) == ("results_rehearsal", [0], 2)
    assert all(e.get("stand_in") == "tiny" for e in rehearsal["datasets"].values() if "path" in e)
    for study in paper["studies"]:
        assert _cells(rehearsal, study) == _cells(paper, study), study   # every dataset, method, setting, backbone
        specs = [run_spec(rehearsal, **run) for run in study_grid(rehearsal, study)]
        specs += [backbone_spec(rehearsal, **start) for start in backbone_runs(rehearsal, study)]
        for spec in specs:   # a dataset's own epochs in paper.yaml (per_dataset) are cut too
            assert (spec.train.epochs, spec.train.max_steps, spec.stand_in) == (1, 2, "tiny"), spec
            assert spec.results == "results_rehearsal"
            adapter = inspect.signature(ADAPTERS.get(spec.plan.adapter)).parameters   # test-time passes too
            passes = {**{k: p.default for k, p in adapter.items()}, **spec.method_params[spec.plan.adapter]}
            assert all(passes[k] == 1 for k in ("epochs", "snapshot_every", "pl_epochs") if k in passes), spec


@pytest.fixture
def rehearsal_entry(tmp_path):
    """The rehearsal's spec of a dataset, its stand-ins written under ``tmp_path / standin``."""
    config = layered("paper.yaml", "rehearsal.yaml")
    config["data_root"] = str(tmp_path / "standin")
    return lambda name: dataset_spec(config, name)


def test_the_fetch_step_writes_a_stand_in_and_holds_it_to_its_own_checksum(rehearsal_entry, tmp_path, capsys, caplog):
    entry = rehearsal_entry("mosi")
    assert entry["source"]["sha256"] == layered("paper.yaml")["datasets"]["mosi"]["source"]["sha256"]   # the real one
    assert main(["fetch", "--dataset", "mosi", "--spec", json.dumps(entry)]) == 0
    said = capsys.readouterr().out
    assert "wrote a random tiny stand-in" in said and "the stand-in's own SHA-256" in said
    path = Path(entry["path"])
    assert path.is_file() and path.is_relative_to(tmp_path / "standin")
    with caplog.at_level(logging.WARNING):
        store = FeatureStore(build_store("mosi", entry, tmp_path / "store"))   # the published digest would refuse it
    assert "checksum enforcement uses the stand-in's own SHA-256" in caplog.text
    assert store.manifest["provenance"]["raw_check"]["checksum"] == "published"   # enforced: the overlay's digest
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(ChecksumMismatch):
        build_store("mosi", entry, tmp_path / "store2")


def test_a_folder_stand_in_is_checked_for_its_layout_and_parallel_fetches_share_one_manifest(rehearsal_entry):
    entries = {name: rehearsal_entry(name) for name in ("iemocap_mmin", "mosi_mult", "iemocap")}
    codes = []
    fetches = [threading.Thread(target=lambda n=n: codes.append(main(["fetch", "--dataset", n, "--spec",
                                                                        json.dumps(entries[n])])))
               for n in entries]
    for fetch in fetches:
        fetch.start()
    for fetch in fetches:
        fetch.join(120)
    assert codes == [0, 0, 0]
    root = Path(entries["iemocap"]["stand_in_root"])
    assert set(json.loads((root / MANIFEST).read_text())["datasets"]) == set(entries)   # no writer lost another's
    checked, note = with_own_checksum("iemocap_mmin_happy", rehearsal_entry("iemocap_mmin_happy"))
    assert "sha256" not in checked["source"] and "expected layout" in note   # a folder: its expect patterns


def test_a_stand_in_mark_without_its_files_or_at_another_scale_is_refused(rehearsal_entry, tmp_path):
    entry = {**rehearsal_entry("mosi_mult"), "path": str(tmp_path / "elsewhere.pkl")}
    entry.pop("stand_in_root")
    assert main(["fetch", "--dataset", "mosi_mult", "--spec", json.dumps(entry)]) == 1   # absolute: cannot write it
    out = tmp_path / "full"
    generate({"mosi_mult": {"loader": "mult", "path": "mosi_data.pkl"}}, out, Scale("tiny"))
    with pytest.raises(ValueError, match="written at scale 'tiny'.*says stand_in: 'full'"):
        with_own_checksum("mosi_mult", {"loader": "mult", "path": str(out / "mosi_data.pkl"), "stand_in": "full"})
    with pytest.raises(FileNotFoundError, match="no stand_in.json"):
        with_own_checksum("mosi_mult", {"loader": "mult", "path": str(tmp_path / "loose.pkl"), "stand_in": "tiny"})


def test_reports_on_stand_in_runs_are_titled_as_rehearsals_and_others_are_not(tmp_path):
    for stand_in in (None, "tiny"):
        files = [_write(tmp_path / str(stand_in) / m / str(seed) / "metrics.json",
                        {**_doc(m, "complete", seed, 0.5), **({"stand_in": stand_in} if stand_in else {})})
                 for m in ("joint", "cggm") for seed in (0, 1)]
        stem = tmp_path / f"table_{stand_in}"
        assert main(["report", "--table", str(stem), "--plot", str(tmp_path / f"plot_{stand_in}"), *map(str, files)]) == 0
        texts = {ext: (tmp_path / f"table_{stand_in}.{ext}").read_text() for ext in ("md", "csv", "tex", "html")}
        title = "REHEARSAL on random stand-in data (tiny): not a result"
        if stand_in is None:
            assert not any(title in t for t in texts.values())
            continue
        assert texts["md"].startswith(f"**{title}**") and texts["csv"].startswith(f"# {title}\n")
        assert texts["tex"].startswith(f"% {title}\n") and f"<body><h2" in texts["html"] and title in texts["html"]
    fig, plain = plt.figure(), plt.figure()
    fig.suptitle("balance: test split")
    with marked("REHEARSAL x"):
        mark_figure(fig)
    mark_figure(plain)
    assert fig.get_suptitle() == "REHEARSAL x\nbalance: test split" and plain.get_suptitle() == ""


def test_runs_on_stand_ins_carry_the_rehearsal_tag_and_say_so_in_the_spec():
    spec = balance_spec()
    assert "rehearsal" not in run_tags(spec, 1)
    assert run_tags(replace(spec, stand_in="tiny"), 1)["rehearsal"] == "tiny"
    config = layered("paper.yaml", "rehearsal.yaml")
    shift = run_spec(config, "shift", "mosi_casp", "casp", "to_sims", 0, "casp_late")
    assert shift.stand_in == "tiny" and backbone_spec(config, "missing", "sims", 0).stand_in == "tiny"


def test_a_subset_of_a_studys_datasets_runs_its_grid_on_those_with_a_note_per_skipped_entry(caplog):
    with caplog.at_level(logging.WARNING, logger="mmrepro.config"):
        config = layered("paper.yaml", studies={"balance": {"datasets": ["mosi_mult"]},
                                                "missing": {"datasets": ["mosi_mult", "sims"]}})
    notes = caplog.text
    assert "studies.balance.per_dataset.iemocap_mmin skipped: the study does not run 'iemocap_mmin'" in notes
    assert "studies.balance.settings.ablation: skips ['iemocap_mmin'], which the study does not run; the setting " \
           "runs nothing" in notes
    assert "studies.missing.report_groups.iemocap skipped" in notes
    balance = config["studies"]["balance"]
    assert list(balance["per_dataset"]) == ["mosi_mult"] and balance["settings"]["only_audio"]["datasets"] == ["mosi_mult"]
    assert {r["dataset"] for r in study_grid(config, "balance")} == {"mosi_mult"}
    assert ("mosi_mult", None, "ogm_ge", "complete") in _cells(config, "balance")
    assert config["studies"]["missing"]["report_groups"] == {}


@pytest.mark.parametrize("override, key", [
    ({"per_dataset": {"mosi_multt": {}}}, "studies.balance.per_dataset.mosi_multt: unknown dataset 'mosi_multt'"),
    ({"settings": {"complete": {"type": "complete", "datasets": ["mosi_mult", "food"]}}},
     "studies.balance.settings.complete.datasets[1]: unknown dataset 'food'"),
])
def test_a_name_that_is_no_dataset_at_all_stays_an_error(override, key):
    with pytest.raises(ConfigError, match=re.escape(f"config key {key}")):
        layered("paper.yaml", studies={"balance": {"datasets": ["mosi_mult"], **override}})
