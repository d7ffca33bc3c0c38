"""The synthetic benchmark: determinism, and the phenomena each study relies on (each test can fail)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from torch import nn

from conftest import small_synth
from mmrepro import metrics, reproducibility
from mmrepro.data import build_store, synth
from mmrepro.data.loader import SplitLoader
from mmrepro.data.store import FeatureStore
from mmrepro.evaluate import evaluate_model
from mmrepro.methods.hooks import JointTraining
from mmrepro.models import build_model
from mmrepro.train import TrainConfig, fit

MODEL = dict(d_model=32, layers=1, heads=4, kernel=3, dropout=0.1, fusion_layers=1)


def _splits(cfg):
    return {name: arrays for name, arrays, _ in synth.generate(cfg)}


def test_same_seed_same_arrays_other_seed_other_arrays():
    cfg = small_synth(train=50, valid=20, test=20)["synth"]
    a, b = _splits(cfg), _splits(copy.deepcopy(cfg))
    other = _splits({**cfg, "seed": 1})
    for split in a:
        for key in a[split]:
            np.testing.assert_array_equal(a[split][key], b[split][key])
    assert not np.allclose(a["train"]["x/audio"], other["train"]["x/audio"])
    assert not np.allclose(a["train"]["y/main"], other["train"]["y/main"])


def test_shares_and_labels_are_as_configured():
    cfg = small_synth(train=4000, valid=20, test=20)["synth"]
    gen = synth.SynthGenerator(cfg)
    arrays, oracle = gen.split("train", 4000)
    y = arrays["y/main"]
    assert y.min() >= -3 and y.max() <= 3
    # the noise-free part has unit variance before scaling (shares sum to 1): std(oracle) ~ label_scale
    assert abs(np.std(oracle["main"]) - cfg["label_scale"]) < 0.15
    # the oracle is far better than chance but not perfect (label noise)
    m = metrics.regression_metrics(oracle["main"], y)
    assert 0.9 < m["corr"] < 0.995
    assert set(np.unique(arrays["y/main_cls"])) == set(range(cfg["num_classes"]))


def test_oracle_scores_are_in_the_manifest(synth_store):
    store = FeatureStore(synth_store)
    for split in ("valid", "test", "test@target_all"):
        assert 0.9 < store.oracle(split, "main")["corr"] <= 1.0
        assert store.oracle(split, "main_cls")["acc"] > 0.7


def _train(store_path, modalities=None, model=None, task="main", epochs=12, extra_split=None):
    reproducibility.configure(0, 1)
    store = FeatureStore(store_path)
    names = modalities or store.schema.modality_names
    loaders = {s: SplitLoader(store.open_split(s), store.schema, task, batch_size=64, shuffle=s == "train", seed=0,
                              modalities=names) for s in ("train", "valid", "test", extra_split) if s}
    model = model or build_model(store.schema, store.schema.task(task), backbone="late", modalities=names, **MODEL)
    result = fit(model, loaders["train"], loaders["valid"], JointTraining(),
                 TrainConfig(epochs=epochs, batch_size=64, lr=2e-3, patience=3, device="cpu"))
    model.load_state_dict(result.best_state)
    return model, store, loaders


def test_weak_modalities_matter_and_nobody_beats_the_oracle(synth_store):
    model_text, store, loaders_text = _train(synth_store, modalities=["text"])
    model_all, _, loaders_all = _train(synth_store)
    task = store.schema.task("main")
    text_only = evaluate_model(model_text, loaders_text["test"], task)
    everything = evaluate_model(model_all, loaders_all["test"], task)
    oracle = store.oracle("test", "main")
    assert text_only["corr"] < oracle["corr"] - 0.2, (text_only, oracle)
    assert everything["corr"] > text_only["corr"] + 0.05, (everything, text_only)
    assert everything["mae"] > oracle["mae"] and everything["corr"] < oracle["corr"]


class TokenProduct(nn.Module):
    """Sums products of projected text and audio tokens at aligned positions (audio length = 2 x text)."""

    task_type = "regression"

    def __init__(self, d_text: int, d_audio: int, rank: int = 8):
        super().__init__()
        self.p, self.q, self.out = nn.Linear(d_text, rank), nn.Linear(d_audio, rank), nn.Linear(rank, 1)

    def forward(self, batch):
        prod = self.p(batch.x["text"]) * self.q(batch.x["audio"][:, ::2])
        return type("Out", (), {"pred": self.out(prod.sum(1)).squeeze(-1), "aux_loss": None})


def test_late_fusion_misses_the_token_level_interaction(tmp_path):
    ds = small_synth()
    ds["synth"]["tasks"]["main"] = {"shared": 0.0, "private": 0.0, "interaction": 1.0}
    path = build_store("synth", ds, tmp_path / "interaction")
    late, store, loaders = _train(path)
    task = store.schema.task("main")
    late_corr = evaluate_model(late, loaders["test"], task)["corr"]
    product, _, loaders = _train(path, model=TokenProduct(32, 16), epochs=20)
    product_corr = evaluate_model(product, loaders["test"], task)["corr"]
    oracle_corr = store.oracle("test", "main")["corr"]
    assert late_corr < oracle_corr - 0.3, (late_corr, oracle_corr)
    assert product_corr > late_corr + 0.2, (product_corr, late_corr)


def test_target_domain_hurts_a_source_model(synth_store):
    model, store, loaders = _train(synth_store, extra_split="test@target_all")
    task = store.schema.task("main")
    source = evaluate_model(model, loaders["test"], task)
    target = evaluate_model(model, loaders["test@target_all"], task)
    assert target["mae"] > source["mae"] * 1.15, (source, target)


def test_interaction_modalities_must_exist():
    cfg = small_synth()["synth"]
    cfg["interaction"]["modalities"] = ["text", "text"]
    with pytest.raises(ValueError, match="two distinct modalities"):
        synth.SynthGenerator(cfg)


def test_ceilings_are_recorded_per_subset_and_ordered(synth_store):
    store = FeatureStore(synth_store)
    names = store.schema.modality_names
    for split in ("train", "valid", "test"):
        full, oracle = store.ceiling(split, "main"), store.oracle(split, "main")
        assert full["corr"] < oracle["corr"] and full["mae"] > oracle["mae"]  # reachable is below the latent optimum
        for m in names:
            alone = store.ceiling(split, "main", [m])
            assert 0.3 < alone["corr"] < full["corr"] - 0.1, (m, alone, full)
        # more modalities, more reachable; order of the names does not matter
        assert store.ceiling(split, "main", ["vision", "audio"]) == store.ceiling(split, "main", ["audio", "vision"])
        assert store.ceiling(split, "main", ["audio", "vision"])["corr"] > store.ceiling(split, "main", ["audio"])["corr"]
    assert store.ceiling("test@target_all", "main") == {}  # no ceiling stated for shifted targets


def test_a_weak_modality_reaches_a_share_of_its_ceiling_on_a_tiny_budget(tmp_path):
    """Vision alone, 800 samples, 6 epochs at d_model 16: R^2 share (corr / ceiling corr)^2 > 0.3
    (measured 0.37; 0.69 with the default budget, see mmrepro.data.synth)."""
    path = build_store("synth", small_synth(train=800, valid=200, test=400), tmp_path / "tiny")
    reproducibility.configure(0, 1)
    store = FeatureStore(path)
    loaders = {s: SplitLoader(store.open_split(s), store.schema, "main", batch_size=32, shuffle=s == "train", seed=0,
                              modalities=["vision"]) for s in ("train", "valid", "test")}
    model = build_model(store.schema, store.schema.task("main"), backbone="late", modalities=["vision"],
                        **{**MODEL, "d_model": 16, "heads": 2, "dropout": 0.0})
    result = fit(model, loaders["train"], loaders["valid"], JointTraining(),
                 TrainConfig(epochs=6, batch_size=32, lr=3e-3, patience=6, device="cpu"))
    model.load_state_dict(result.best_state)
    corr = evaluate_model(model, loaders["test"], store.schema.task("main"))["corr"]
    ceiling = store.ceiling("test", "main", ["vision"])["corr"]
    assert corr < ceiling + 0.05, (corr, ceiling)
    assert (max(corr, 0.0) / ceiling) ** 2 > 0.3, (corr, ceiling)
