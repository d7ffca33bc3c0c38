"""The shift study's test-time baselines: what each updates, and that none reads target labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import small_synth
from mmrepro.data import build_store
from mmrepro.data.loader import SplitLoader
from mmrepro.data.store import FeatureStore
from mmrepro.evaluate import predict
from mmrepro.methods.adapters import SourceOnly, SplitPool, layer_norm_parameters
from mmrepro.methods.registry import ADAPTERS, build
from mmrepro.methods.tta_baselines import SSA, feature_statistics, views
from mmrepro.models import build_model

MODEL = dict(backbone="casp_late", d_model=8, layers=1, heads=2, kernel=3, dropout=0.1, fusion_layers=1)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = build_store("synth", small_synth(train=64, valid=32, test=64), tmp_path_factory.mktemp("tta") / "synth")
    return FeatureStore(path)


def _model(store, seed=0):
    torch.manual_seed(seed)
    return build_model(store.schema, store.schema.task("main"), **MODEL)


def _loader(store, split="test@target_all", arrays=None):
    arrays = arrays if arrays is not None else store.open_split(split)
    return SplitLoader(arrays, store.schema, "main", batch_size=32, shuffle=False, seed=0)


def _stats(store):
    model = _model(store)
    model.eval()
    with torch.no_grad():
        features = torch.cat([model(b).fused for b in _loader(store, "train")]).double()
    return {k: v.float() for k, v in feature_statistics(features).items()}


def _adapter(store, name, protocol):
    params = {} if name == "tta_average" else {"protocol": protocol, "batch_size": 32}
    context = {"source_stats": _stats(store)} if name == "ssa" else {}
    return build(ADAPTERS, name, params, model=_model(store), **context)


UPDATING = ["norm_view_consistency", "mean_teacher", "ssa"]


@pytest.mark.parametrize("name,protocol", [("tta_average", "online"), *((n, p) for n in UPDATING
                                                                        for p in ("online", "offline"))])
def test_nan_labels_change_nothing(store, name, protocol):
    preds = []
    for poison in (False, True):
        arrays = dict(store.open_split("test@target_all"))
        if poison:
            arrays["y/main"] = np.full(len(arrays["ids"]), np.nan, dtype=np.float32)
        torch.manual_seed(1)
        adapter = _adapter(store, name, protocol)
        if adapter.offline:
            adapter.adapt(SplitPool(_loader(store, arrays=arrays)))
        preds.append(predict(adapter.predict, _loader(store, arrays=arrays))[0])
    assert np.isfinite(preds[1]).all()
    np.testing.assert_allclose(preds[0], preds[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", UPDATING)
def test_updating_baselines_move_predictions_and_norm_only_ones_only_norms(store, name):
    adapter = _adapter(store, name, "online")
    before = {n: p.detach().clone() for n, p in adapter.model.named_parameters()}
    source = predict(SourceOnly(_model(store)).predict, _loader(store))[0]
    adapted = predict(adapter.predict, _loader(store))[0]
    assert np.abs(adapted - source).max() > 1e-6
    changed = {n for n, p in adapter.model.named_parameters() if not torch.equal(p, before[n])}
    norms = {n for n, p in adapter.model.named_parameters() if id(p) in {id(q) for q in layer_norm_parameters(adapter.model)}}
    assert changed
    if name != "mean_teacher":  # CoTTA updates every weight
        assert changed <= norms


def test_tta_average_is_the_mean_over_the_modality_drop_views(store):
    model = _model(store).eval()
    batch = next(iter(_loader(store)))
    with torch.no_grad():
        manual = sum(model(v).pred for v in views(batch)) / (len(batch.x) + 1)
    torch.testing.assert_close(build(ADAPTERS, "tta_average", {}, model=model).predict(batch), manual)


def test_mean_teacher_full_restore_keeps_the_source_weights(store):
    adapter = build(ADAPTERS, "mean_teacher", {"restore": 1.0}, model=_model(store))
    adapter.predict(next(iter(_loader(store))))
    for n, p in adapter.model.named_parameters():
        torch.testing.assert_close(p, adapter.source[n], rtol=0, atol=0)


def test_feature_statistics_recover_the_principal_directions():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 3, generator=g, dtype=torch.float64) * torch.tensor([3.0, 1.0, 0.3], dtype=torch.float64)
    stats = feature_statistics(x + 5.0, dims=2)
    torch.testing.assert_close(stats["mean"], torch.full((3,), 5.0, dtype=torch.float64), atol=0.2, rtol=0)
    torch.testing.assert_close(stats["variances"], torch.tensor([9.0, 1.0], dtype=torch.float64), rtol=0.1, atol=0)
    torch.testing.assert_close(stats["directions"].abs(), torch.eye(3, 2, dtype=torch.float64), atol=0.05, rtol=0)


def test_ssa_lowers_the_subspace_discrepancy_on_a_shifted_target(store):
    adapter = SSA(_model(store), source_stats=_stats(store), protocol="offline", epochs=5, batch_size=64, lr=1e-2)
    batch = next(iter(SplitPool(_loader(store, "train@target_all")).loader))
    adapter.model.eval()
    with torch.no_grad():
        before = adapter.loss(batch).item()
    adapter.adapt(SplitPool(_loader(store, "train@target_all")))
    with torch.no_grad():
        assert adapter.loss(batch).item() < before
