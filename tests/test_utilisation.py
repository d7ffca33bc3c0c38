"""Utilisation tracking measures each modality without changing what the model learns."""

from __future__ import annotations

import torch

from mmrepro import reproducibility
from mmrepro.data.loader import SplitLoader
from mmrepro.data.store import FeatureStore
from mmrepro.methods import HOOKS, build
from mmrepro.methods.balance.utilisation import UtilisationTracking, with_utilisation
from mmrepro.models import build_model
from mmrepro.train import TrainConfig, fit

MODEL = dict(backbone="late", d_model=8, layers=1, heads=2, kernel=3, dropout=0.1, fusion_layers=1)


def _fit(store_path, hook):
    reproducibility.configure(0, 1)
    store = FeatureStore(store_path)
    train, valid = (SplitLoader(store.open_split(s), store.schema, "main", batch_size=128, shuffle=s == "train", seed=0)
                    for s in ("train", "valid"))
    model = build_model(store.schema, store.schema.task("main"), **MODEL)
    return fit(model, train, valid, hook, TrainConfig(epochs=2, batch_size=128, lr=1e-3, device="cpu"))


def test_tracking_logs_utilisation_and_leaves_training_bit_for_bit_unchanged(synth_store):
    plain = _fit(synth_store, build(HOOKS, "joint"))
    tracked = _fit(synth_store, with_utilisation(build(HOOKS, "joint")))
    for key, value in plain.best_state.items():
        assert torch.equal(value, tracked.best_state[key]), key
    last = tracked.history[-1]
    assert {"util_text", "util_audio", "util_vision"} <= set(last)
    assert all(0.0 <= last[f"util_{m}"] <= 1.0 for m in ("text", "audio", "vision"))
    assert plain.history[-1]["valid_loss"] == last["valid_loss"]


def test_cggm_measures_utilisation_itself():
    cggm = build(HOOKS, "cggm")
    assert with_utilisation(cggm) is cggm
    assert isinstance(with_utilisation(build(HOOKS, "joint")), UtilisationTracking)
