"""Cross-dataset shift pairs (CASP's MOSI / MOSEI / CH-SIMS): the width check at config time, SIMS
labels on MOSI's scale, and a source model of one corpus adapted and scored on another.

The corpora are tiny MMSA-format pickles written here (``test_real_data``'s layout)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from conftest import SCHEMA, default_config
from mmrepro.config import ConfigError, load_schema, run_spec, study_grid, validate_config
from mmrepro.data import build_store
from mmrepro.data.mmsa import convert_mmsa
from mmrepro.data.schema import DataValidationError
from mmrepro.evaluate import metric_kind
from mmrepro.data.store import FeatureStore
from mmrepro.checkpoints import save as save_model
from mmrepro.jobs import adapt_job
from mmrepro.models import build_model
from test_real_data import dump, mmsa_data

CORPORA = ("mosi", "mosei", "sims")
MODEL = dict(backbone="casp_late", d_model=8, layers=1, heads=2, kernel=3, dropout=0.1, fusion_layers=1)


def _config(tmp_path, widths: dict[str, int], paths: dict[str, str] | None = None) -> dict:
    """The default config with one MMSA entry per corpus (audio width per corpus) and CASP's pairs."""
    config = default_config()
    for name in CORPORA:
        path = (paths or {}).get(name) or str(dump(mmsa_data(d_audio=widths[name], sims=name == "sims"),
                                                   tmp_path / name / "features.pkl"))
        params = {"label_range": [-1, 1], "label_scale": 3.0} if name == "sims" else {}
        config["datasets"][name] = {"loader": "mmsa", "path": path, "task": "sentiment", "pretrain_task": "sentiment",
                                    "params": params}
    config["studies"]["shift"].update(
        datasets=list(CORPORA), model=MODEL,
        settings={f"to_{t}": {"type": "dataset", "target": t} for t in CORPORA})
    config["results"] = str(tmp_path / "results")
    return config


def _validate(config: dict) -> dict:
    return validate_config(config, load_schema(SCHEMA))


def test_a_pair_whose_widths_differ_fails_at_config_time_naming_both(tmp_path):
    with pytest.raises(ConfigError) as e:
        _validate(_config(tmp_path, {"mosi": 5, "mosei": 7, "sims": 5}))
    msg = str(e.value)
    assert msg.startswith("config key studies.shift.settings.to_mosi.target") and "'mosei'" in msg
    assert "'audio': 5" in msg and "'audio': 7" in msg


def test_equal_widths_give_the_six_ordered_pairs(tmp_path):
    config = _validate(_config(tmp_path, dict.fromkeys(CORPORA, 5)))
    pairs = {(r["dataset"], config["studies"]["shift"]["settings"][r["setting"]]["target"])
             for r in study_grid(config, "shift")}
    assert {p for p in pairs if p[0] != p[1]} == set(itertools.permutations(CORPORA, 2))


def test_no_two_published_mmsa_files_share_widths(tmp_path):
    """Known before download: MOSI 768/5/20, MOSEI 768/74/35, SIMS 768/33/709 (datasets.md)."""
    published = {"mosi": "MMSA/MOSI/Processed/unaligned_50.pkl", "mosei": "MMSA/MOSEI/Processed/unaligned_50.pkl",
                 "sims": "MMSA/SIMS/Processed/unaligned_39.pkl"}
    for source, target in itertools.permutations(CORPORA, 2):
        config = _config(tmp_path, {}, paths={n: str(tmp_path / "absent" / p) for n, p in published.items()})
        config["studies"]["shift"]["settings"] = {"pair": {"type": "dataset", "target": target}}
        config["studies"]["shift"]["datasets"] = [source]
        with pytest.raises(ConfigError, match="feature widths differ"):
            _validate(config)


def test_sims_labels_are_put_on_the_minus_three_to_three_scale(tmp_path):
    data = mmsa_data(sims=True)
    schema, splits, _ = convert_mmsa(dump(data, tmp_path / "sims.pkl"), name="sims", label_range=(-1, 1),
                                     label_scale=3.0)
    train = {split: arrays for split, arrays, _ in splits}["train"]
    np.testing.assert_allclose(train["y/sentiment"], 3 * np.asarray(data["train"]["regression_labels"]), rtol=1e-6)
    assert metric_kind(schema.task("sentiment")) == "regression"  # MOSI's metrics, not SIMS's bins


def test_a_source_model_of_one_corpus_is_adapted_and_scored_on_another(tmp_path):
    config = _validate(_config(tmp_path, dict.fromkeys(CORPORA, 5)))
    config["methods"]["casp"] = {"epochs": 1, "snapshot_every": 1, "pl_epochs": 1, "batch_size": 4}
    stores = {n: build_store(n, config["datasets"][n], tmp_path / "stores" / n) for n in ("mosi", "sims")}
    spec = run_spec(config, "shift", "mosi", "casp", "to_sims", 0)
    torch.manual_seed(0)
    source = build_model(FeatureStore(stores["mosi"]).schema, FeatureStore(stores["mosi"]).schema.task("sentiment"),
                         **MODEL)
    save_model(source, tmp_path / "model.pt", spec)
    summary = adapt_job(spec, stores["sims"], tmp_path / "model.pt", tmp_path / "run", 1)
    assert summary["dataset"] == "mosi" and summary["setting"] == "to_sims" and summary["trainable_params"] > 0
    assert summary["task"] == "regression" and np.isfinite(summary["metrics"]["test"]["mae"])
    # a target of other widths is refused at job time too, not read through fresh input projections
    wide = dict(config["datasets"]["mosei"], path=str(dump(mmsa_data(d_audio=7), tmp_path / "wide.pkl")))
    with pytest.raises(DataValidationError, match="shapes differ"):
        adapt_job(spec, build_store("wide", wide, tmp_path / "stores" / "wide"), tmp_path / "model.pt",
                  tmp_path / "run2", 1)
