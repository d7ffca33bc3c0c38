"""CASP as a test-time adapter: its loss, its sample selection, what it updates, and the offline job."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from conftest import default_config, small_synth
from mmrepro import reproducibility
from mmrepro.config import run_spec
from mmrepro.data import build_store
from mmrepro.data.loader import SplitLoader
from mmrepro.data.store import FeatureStore
from mmrepro.evaluate import predict
from mmrepro.jobs import adapt_job
from mmrepro.methods.adapters import SourceOnly, SplitPool, layer_norm_parameters
from mmrepro.methods.casp import CASP, mean_batch_l1, nt_xent, official_acc2, select_stable
from mmrepro.methods.hooks import JointTraining
from mmrepro.models import build_model
from mmrepro.tracking import init_store, tracking_uri
from mmrepro.train import TrainConfig, fit

MODEL = dict(backbone="late", d_model=8, layers=1, heads=2, kernel=3, dropout=0.1, fusion_layers=1)
SMALL = dict(epochs=2, snapshot_every=1, pl_epochs=1, batch_size=64)


def test_nt_xent_matches_a_hand_worked_two_by_two_case():
    eye = torch.eye(2)
    # views agree: each anchor's positive has cosine 1, its two negatives 0 -> log(1 + 2 e^{-1/0.5})
    torch.testing.assert_close(nt_xent(eye, eye, 0.5), torch.tensor(math.log(1 + 2 * math.exp(-2.0))))
    # views swapped: the positive is orthogonal, one negative is identical -> log(2 + e^2); scale-free
    swapped = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    torch.testing.assert_close(nt_xent(3.0 * eye, swapped, 0.5), torch.tensor(math.log(2 + math.exp(2.0))))


def test_stability_selection_keeps_the_stable_or_as_the_code_the_least_stable():
    # instabilities 0, 0.1, 0.5, 1.0 (mean |change| over two consecutive pairs)
    snaps = np.array([[1.0, 0.0, 0.0, 0.0], [1.0, 0.1, 0.5, 1.0], [1.0, 0.2, 1.0, 2.0]])
    label, keep = select_stable(snaps, "stable", keep_quantile=0.5)
    np.testing.assert_allclose(label, [1.0, 0.1, 0.5, 1.0])
    assert keep.tolist() == [True, True, False, False]
    _, keep = select_stable(snaps, "official_code", keep_quantile=0.5)  # the code's fixed 0.95 quantile
    assert keep.tolist() == [False, False, False, True]


def test_the_code_counts_zero_labels_negative_and_averages_batch_means():
    y = np.array([0.0, 0.0, 1.0, -1.0, 2.0])
    pred = np.array([0.5, -0.5, 1.0, -1.0, 0.0])
    # > 0 on both sides: [T|F] [F|F] [T|T] [F|F] [F|T] -> 3 of 5 agree (>= 0, acc2_has0, would give 4)
    assert official_acc2(pred, y) == pytest.approx(0.6)
    # batches of 2, the last partial: errors (.5, .5) (0, 0) (2) -> mean of (.5, 0, 2); per sample 3 / 5
    assert mean_batch_l1(pred, y, 2) == pytest.approx(2.5 / 3)
    assert mean_batch_l1(pred, y, 5) == pytest.approx(0.6)


def _loader(store, split, **kw):
    return SplitLoader(store.open_split(split), store.schema, "main", batch_size=128, shuffle=False, seed=0, **kw)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    return build_store("synth", small_synth(train=600, valid=200, test=300), tmp_path_factory.mktemp("casp") / "synth")


@pytest.fixture(scope="module")
def converged(store_path):
    """A late-fusion model trained on the source until its validation loss levels off."""
    reproducibility.configure(0, 1)
    store = FeatureStore(store_path)
    model = build_model(store.schema, store.schema.task("main"), **MODEL)
    train = SplitLoader(store.open_split("train"), store.schema, "main", batch_size=64, shuffle=True, seed=0)
    result = fit(model, train, _loader(store, "valid"), JointTraining(),
                 TrainConfig(epochs=8, batch_size=64, lr=3e-3, patience=3, device="cpu"))
    model.load_state_dict(result.best_state)
    return store, model.state_dict()


def _model(store, state):
    model = build_model(store.schema, store.schema.task("main"), **MODEL)
    model.load_state_dict(state)
    return model


def _mae(adapter, loader):
    pred, y = predict(adapter.predict, loader)
    return float(np.abs(pred - y).mean())


def test_only_the_layer_norms_inside_transformer_layers_change(converged):
    store, state = converged
    model = _model(store, state)
    norms = {id(p) for p in layer_norm_parameters(model)}
    names = {n for n, p in model.named_parameters() if id(p) in norms}
    assert names and all(".layers." in n and (".norm1." in n or ".norm2." in n) for n in names)
    torch.manual_seed(0)
    CASP(model, **SMALL).adapt(SplitPool(_loader(store, "test@target_all")))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, state[n])}
    assert changed and changed <= names


def test_stage_two_may_train_everything_when_asked(converged):
    store, state = converged
    model = _model(store, state)
    torch.manual_seed(0)
    CASP(model, stages=["pseudo_label"], stage2_params="all", **SMALL).adapt(SplitPool(_loader(store, "test")))
    assert not torch.equal(model.head.out.weight, state["head.out.weight"])


@pytest.mark.parametrize("protocol", ["offline", "online"])
def test_unshifted_stream_barely_moves_a_converged_model(converged, protocol):
    """On source data CASP should not hurt: the test MAE moves by less than 0.05 (labels span [-3, 3])."""
    store, state = converged
    test = _loader(store, "test")
    before = _mae(SourceOnly(_model(store, state)), test)
    torch.manual_seed(0)
    adapter = CASP(_model(store, state), protocol=protocol, **SMALL)
    if protocol == "offline":
        adapter.adapt(SplitPool(_loader(store, "train")))
    assert abs(_mae(adapter, test) - before) < 0.05


@pytest.mark.parametrize("protocol", ["offline", "online"])
def test_nan_labels_change_nothing(converged, protocol):
    store, state = converged
    preds = []
    for poison in (False, True):
        arrays = {k: v[:200] for k, v in store.open_split("train@target_audio").items()}
        if poison:
            arrays["y/main"] = np.full(len(arrays["ids"]), np.nan, dtype=np.float32)
        loader = SplitLoader(arrays, store.schema, "main", batch_size=64, shuffle=False, seed=0)
        torch.manual_seed(0)
        adapter = CASP(_model(store, state), protocol=protocol, **SMALL)
        if protocol == "offline":
            adapter.adapt(SplitPool(loader))
        preds.append(predict(adapter.predict, loader)[0])
    assert np.isfinite(preds[1]).all()
    np.testing.assert_allclose(preds[0], preds[1], rtol=0, atol=1e-6)


def test_offline_adapt_job_records_target_error_per_epoch(converged, store_path, tmp_path):
    store, state = converged
    torch.save({"state_dict": state}, tmp_path / "model.pt")
    config = default_config()
    config["model"] = {**config["model"], **MODEL}
    config["studies"]["shift"].pop("model")
    config["studies"]["shift"]["methods"] = ["casp"]
    config["methods"]["casp"] = {**SMALL, "label_use": "official_code"}
    config["results"] = str(tmp_path / "results")
    spec = run_spec(config, "shift", "synth", "casp", "target_all", 0)
    init_store(tracking_uri(spec.results, spec.tracking.uri), ["shift"], tmp_path / "artifacts")
    summary = adapt_job(spec, store_path, tmp_path / "model.pt", tmp_path / "run", 1)
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]  # before, 2 contrastive epochs, 1 pseudo-label epoch
    assert summary["protocol"] == "offline" and summary["target_labels_used"] is True
    assert np.isfinite(summary["metrics"]["test"]["mae"])


@pytest.mark.parametrize("backbone", ["casp_late", "casp_early"])
def test_casp_adapts_the_layer_norms_of_the_paper_backbones(store_path, backbone):
    store = FeatureStore(store_path)
    torch.manual_seed(0)
    model = build_model(store.schema, store.schema.task("main"), **{**MODEL, "backbone": backbone})
    before = copy.deepcopy(model.state_dict())
    names = {n for n, p in model.named_parameters() if id(p) in {id(q) for q in layer_norm_parameters(model)}}
    assert names and all(".layers." in n for n in names)  # the encoders' final LayerNorm stays out
    arrays = {k: v[:48] for k, v in store.open_split("train@target_all").items()}
    CASP(model, **SMALL).adapt(SplitPool(SplitLoader(arrays, store.schema, "main", batch_size=24, shuffle=False, seed=0)))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= names


def test_a_wander_adapted_model_is_reloaded_and_adapted_by_casp(converged, store_path, tmp_path):
    """Crossing studies: a peft-trained checkpoint carries its transform, so ``adapt`` rebuilds it."""
    from mmrepro.checkpoints import save as save_model
    from mmrepro.jobs import RunData, _load_trained
    from mmrepro.methods.registry import TRANSFORMS, build

    store, state = converged
    config = default_config()
    config["model"] = {**config["model"], **MODEL}
    config["studies"]["shift"].pop("model")
    config["methods"]["wander"] = {"rank": 2, "drank": 2, "trank": 2}
    config["methods"]["casp"] = SMALL
    config["results"] = str(tmp_path / "results")
    config["studies"]["peft"] = {**config["studies"]["peft"], "methods": ["wander"]}
    config["studies"]["shift"] = {**config["studies"]["shift"], "backbones": None,
                                  "source_model": {"study": "peft", "method": "wander", "setting": "complete"}}
    trained = run_spec(config, "peft", "synth", "wander", "complete", 0)
    model = build(TRANSFORMS, "wander", config["methods"]["wander"]).apply(_model(store, state))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))  # as if Wander had been trained
    save_model(model, tmp_path / "model.pt", trained)
    spec = run_spec(config, "shift", "synth", "casp", "target_all", 0)
    reloaded = _load_trained(RunData(store_path, spec), spec, tmp_path / "model.pt")
    batch = next(iter(_loader(store, "test")))
    model.eval(), reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(batch).pred, model(batch).pred)
    init_store(tracking_uri(spec.results, spec.tracking.uri), ["shift"], tmp_path / "artifacts")
    summary = adapt_job(spec, store_path, tmp_path / "model.pt", tmp_path / "run", 1)
    assert np.isfinite(summary["metrics"]["test"]["mae"]) and summary["trainable_params"] > 0


def test_official_label_use_keeps_the_codes_acc2_epoch_and_steps_on_its_loss(converged, monkeypatch):
    """Zero labels make the code's Acc-2 (``> 0``) prefer epoch 2 where MMSA's has-0 variant prefers
    epoch 1; 5 validation samples in batches of 2 make the code's loss differ from the per-sample MAE."""
    store, state = converged
    model = _model(store, state)
    y = np.array([0.0, 0.0, 0.0, 1.0, -1.0])
    scripted = [np.array([0.1, 0.1, 0.1, 1.0, -1.0]),  # the code's Acc-2 2/5, has-0 5/5
                np.array([-0.1, -0.1, -0.1, 1.0, -0.5])]  # the code's Acc-2 5/5, has-0 2/5
    states, stepped = [], []

    def validate():
        states.append(copy.deepcopy(model.state_dict()))
        return scripted[len(states) - 1], y

    step = torch.optim.lr_scheduler.ReduceLROnPlateau.step
    monkeypatch.setattr(torch.optim.lr_scheduler.ReduceLROnPlateau, "step",
                        lambda self, value: stepped.append(value) or step(self, value))
    arrays = {k: v[:8] for k, v in store.open_split("train@target_all").items()}
    pool = SplitPool(SplitLoader(arrays, store.schema, "main", batch_size=8, shuffle=False, seed=0))
    torch.manual_seed(0)
    CASP(model, stages=["contrastive"], epochs=2, snapshot_every=1, pl_epochs=0, batch_size=2,
         label_use="official_code").adapt(pool, validate=validate)
    assert len(states) == 2 and not all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert all(torch.equal(model.state_dict()[k], states[1][k]) for k in states[1])  # epoch 2 kept
    expected = [mean_batch_l1(p, y, 2) for p in scripted]
    np.testing.assert_allclose(stepped, expected)
    assert stepped[1] != pytest.approx(float(np.abs(scripted[1] - y).mean()))  # not the per-sample MAE
