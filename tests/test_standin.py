"""Stand-in raw data (``mmrepro stand-in``): every real dataset entry of config/paper.yaml gets tiny
files that the project's own pipeline step (fetch check + converter + store, as the make_data rule
runs it) converts without error, with the widths and lengths the real release has."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from mmrepro.cli import main
from mmrepro.config import dataset_spec, load_schema, merge_config, validate_config
from mmrepro.data import build_store
from mmrepro.data.iemocap_h5 import IEMOCAP_4CLASS_TOTALS
from mmrepro.data.mmsa import EMOTIONS
from mmrepro.data.standin import MANIFEST, OVERLAY, Scale, generate
from mmrepro.data.standin.mmin import fold_splits, utterances
from mmrepro.data.standin.plan import allocate, choose_counts
from mmrepro.data.standin.sequences import TINY
from mmrepro.data.store import FeatureStore

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
PAPER = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
REAL = sorted(n for n, e in PAPER["datasets"].items() if e["loader"] != "synth")

# What each release holds, (text, audio, vision) padded lengths and widths, written down from
# datasets.md and the converters' docs (not from the generator, so a wrong width there fails here).
MMSA_UNALIGNED, MMSA_ALIGNED, SIMS_LENGTHS = (50, 500, 375), (50, 50, 50), (39, 400, 55)
CASP = (768, 33, 709)   # one extractor set for all three corpora (assumed widths; equal is what matters)
DECLARED = {
    "mosi": (MMSA_UNALIGNED, (768, 5, 20)), "mosi_aligned": (MMSA_ALIGNED, (768, 5, 20)),
    "mosei": (MMSA_UNALIGNED, (768, 74, 35)), "mosei_aligned": (MMSA_ALIGNED, (768, 74, 35)),
    "sims": (SIMS_LENGTHS, (768, 33, 709)),
    "mosi_casp": (MMSA_UNALIGNED, CASP), "mosei_casp": (MMSA_UNALIGNED, CASP), "sims_casp": (SIMS_LENGTHS, CASP),
    "mosi_mult": ((50, 50, 50), (300, 5, 20)), "mosei_mult": ((50, 50, 50), (300, 74, 35)),
    "iemocap": ((20, 20, 20), (300, 74, 35)),
    **{n: ((22, 350, 50), (1024, 130, 342)) for n in REAL if n.startswith("iemocap_mmin")},
}


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """Tiny stand-ins of every entry, and config.yaml + paper.yaml + the overlay, validated."""
    out = tmp_path_factory.mktemp("standin") / "data"
    manifest = generate(PAPER["datasets"], out, Scale("tiny"), configs=["config/paper.yaml"])
    config: dict = {}
    for layer in (REPO / "config" / "config.yaml", REPO / "config" / "paper.yaml", out / OVERLAY):
        merge_config(config, yaml.safe_load(layer.read_text()))
    config["results"] = str(out.parent / "results")
    return {"out": out, "manifest": manifest, "config": validate_config(config, load_schema(SCHEMA))}


def test_every_real_entry_is_declared_here():
    assert set(REAL) == set(DECLARED) | {"food101", "brats2021"}


@pytest.mark.parametrize("name", REAL)
def test_tiny_stand_in_converts_with_the_real_shapes(stand_in, name, tmp_path):
    entry = stand_in["config"]["datasets"][name]
    assert entry["stand_in"] == "tiny" and Path(entry["path"]).is_relative_to(stand_in["out"])
    store = FeatureStore(build_store(name, dataset_spec(stand_in["config"], name), tmp_path / name))
    mods = {m.name: m for m in store.schema.modalities}
    tasks = {t.name for t in store.schema.tasks}   # the task the grid trains on (MMIN's views: one emotion)
    assert {entry["task"], PAPER["datasets"][name].get("pretrain_task", entry["task"])} <= tasks, tasks
    if name in DECLARED:
        lengths, widths = DECLARED[name]
        assert [(mods[m].length, mods[m].dim) for m in ("text", "audio", "vision")] == list(zip(lengths, widths))
    elif name == "food101":
        for m, param in (("text", "text_encoder"), ("image", "image_encoder")):
            hidden = json.loads((Path(entry["params"][param]) / "config.json").read_text())["hidden_size"]
            assert (mods[m].length, mods[m].dim) == (50, hidden)   # the converter's defaults: 50 tokens each
        assert store.schema.task("label").num_classes == 101
    else:
        crop = tuple(PAPER["datasets"][name]["params"]["crop"])
        assert all(m.shape == (1, *crop) for m in mods.values())
        for split in store.schema.splits:   # every case holds all three tumour labels (4 -> 3 inside)
            seg = np.asarray(store.open_split(split)["y/seg"])
            assert all(set(np.unique(case)) == {0, 1, 2, 3} for case in seg)


def test_mmsa_padding_is_consistent_with_the_lengths(stand_in, tmp_path):
    store = FeatureStore(build_store("mosi", dataset_spec(stand_in["config"], "mosi"), tmp_path / "mosi"))
    train = store.open_split("train")
    assert len(train["ids"]) == TINY["train"]
    for m in ("text", "audio", "vision"):
        x, n = np.asarray(train[f"x/{m}"]), np.asarray(train[f"len/{m}"])
        assert (n >= 1).all() and (n <= x.shape[1]).all()
        past = np.arange(x.shape[1])[None, :] >= n[:, None]
        assert not x[past].any() and np.abs(x[~past]).sum(axis=-1).all()


def test_overlay_enforces_each_files_own_checksum_and_the_manifest_records_counts(stand_in):
    overlay = yaml.safe_load((stand_in["out"] / OVERLAY).read_text())["datasets"]
    assert set(overlay) == set(REAL)
    manifest = json.loads((stand_in["out"] / MANIFEST).read_text())
    for name, entry in overlay.items():
        rel = manifest["datasets"][name]
        if PAPER["datasets"][name]["loader"] in ("mmsa", "mult"):   # one file: its own digest, enforced
            assert entry["source"]["sha256"] == entry["params"]["sha256"] == manifest["paths"][rel]["sha256"]
        assert entry["path"] == str(stand_in["out"] / rel)
    assert manifest["paths"]["MulT/iemocap_data.pkl"]["counts"]["real"] == {"train": 2717, "valid": 798, "test": 938}


def test_full_scale_keeps_real_counts_and_cuts_past_the_budget_in_proportion():
    real = {"train": 16326, "valid": 1871, "test": 4659}
    assert choose_counts(Scale("full"), real, TINY, 1000).written == real
    cut = choose_counts(Scale("full", max_bytes=10**9), real, TINY, 354_700)   # MOSEI unaligned, ~8.1 GB
    assert cut.cut and cut.real == real
    factor = 10**9 / (354_700 * sum(real.values()))
    assert all(abs(cut.written[s] - real[s] * factor) <= 1 for s in real)
    assert allocate(10, [3, 1], minimum=2) == [7, 3] and sum(allocate(5531, [1708, 1636, 1084, 1103])) == 5531


def test_full_iemocap_has_the_corpus_class_totals_and_disjoint_folds():
    utts, counts = utterances(Scale("full"))
    assert counts.written == {"all": sum(IEMOCAP_4CLASS_TOTALS.values())} and counts.cut is None
    totals = np.bincount([c for _, c in utts], minlength=4)
    assert dict(zip(EMOTIONS, totals.tolist())) == IEMOCAP_4CLASS_TOTALS
    for fold in (1, 2, 10):
        parts = fold_splits(utts, fold)
        names = [n for items in parts.values() for n, _ in items]
        assert len(names) == len(set(names)) == len(utts)
        for split in ("valid", "test"):   # the held-out session, one speaker each, every class present
            assert {int(n[3:5]) for n, _ in parts[split]} == {(fold + 1) // 2}
            assert len({c for _, c in parts[split]}) == 4


def test_cli_writes_a_subset_and_refuses_a_folder_of_other_files(tmp_path, capsys):
    run = ["stand-in", "--scale", "tiny", "--configfile", str(REPO / "config" / "paper.yaml")]
    assert main([*run, "--out", str(tmp_path / "s"), "--datasets", "mosi_mult", "iemocap"]) == 0
    assert sorted(yaml.safe_load((tmp_path / "s" / OVERLAY).read_text())["datasets"]) == ["iemocap", "mosi_mult"]
    assert main([*run, "--out", str(tmp_path / "s"), "--datasets", "sims"]) == 0   # a second run adds to the first
    assert sorted(yaml.safe_load((tmp_path / "s" / OVERLAY).read_text())["datasets"]) == ["iemocap", "mosi_mult", "sims"]
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "mosi_data.pkl").write_bytes(b"precious")
    assert main([*run, "--out", str(tmp_path / "real")]) == 2
    assert "no stand-in folder" in capsys.readouterr().err
    assert (tmp_path / "real" / "mosi_data.pkl").read_bytes() == b"precious"
    assert main([*run, "--out", str(tmp_path / "u"), "--datasets", "mosi_typo"]) == 2
    assert "unknown dataset 'mosi_typo'" in capsys.readouterr().err
