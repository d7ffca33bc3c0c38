"""Resuming a run: a job stopped after epoch 1 and resumed from the loop's checkpoint continues the
same run as an uninterrupted one, for every balance hook (the hook's own state is in the checkpoint)."""

from __future__ import annotations

import io
import math

import pytest
import torch
from test_cggm_segmentation import batches, tiny_model

from mmrepro import reproducibility
from mmrepro.data import build_store
from mmrepro.data.loader import SplitLoader
from mmrepro.data.store import FeatureStore
from mmrepro.methods.balance.cggm import CGGM
from mmrepro.methods.balance.utilisation import with_utilisation
from mmrepro.methods.registry import HOOKS, build
from mmrepro.models import build_model
from mmrepro.train import TrainConfig, fit, segmentation_loss

from conftest import small_synth

MODEL = dict(backbone="late", d_model=8, layers=1, heads=2, kernel=3, dropout=0.1, fusion_layers=1)
EPOCHS = 3

#: name -> (hook, params), with windows and periods short enough that the hook's state shapes epochs 2-3.
CASES = {
    "joint": ("joint", {}),
    "cggm": ("cggm", {}),
    "cggm_gradients": ("cggm", {"direction": "gradients"}),
    "ogm_ge": ("ogm_ge", {"alpha": 0.5, "modulation_starts": 2, "modulation_ends": 2}),
    "agm": ("agm", {"modulation_ends": 2}),
    "pmr": ("pmr", {}),
    "mslr_dynamic": ("mslr", {"variant": "dynamic", "period": 2, "lrs": {"text": 3e-3}}),
    "greedy": ("greedy", {"start_epoch": 2, "window": 3}),
    "joint_utilisation": ("joint", {}),
}


def make_hook(case: str):
    name, params = CASES[case]
    hook = build(HOOKS, name, params)
    return with_utilisation(hook) if case.endswith("_utilisation") else hook


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    return build_store("synth", small_synth(train=128, valid=64, test=8), tmp_path_factory.mktemp("tiny") / "synth")


def _fit(store_path, case: str, epochs: int, checkpoint=None):
    reproducibility.configure(0, 1)
    store = FeatureStore(store_path)
    train, valid = [SplitLoader(store.open_split(s), store.schema, "main", batch_size=16, shuffle=s == "train", seed=0)
                    for s in ("train", "valid")]
    model = build_model(store.schema, store.schema.task("main"), **MODEL)
    cfg = TrainConfig(epochs=epochs, batch_size=16, lr=1e-3, patience=10, device="cpu")
    hook = make_hook(case)
    result = fit(model, train, valid, hook, cfg, checkpoint=checkpoint, checkpoint_key="k")
    return result, hook.state_dict()


def _interrupted(store_path, case: str, ckpt):
    """Stop after epoch 1 (its own process in real life), then resume with fresh everything."""
    first, _ = _fit(store_path, case, 1, checkpoint=ckpt)
    assert first.epochs_run == 1
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)  # the loop's convention
    assert saved["state"]["epoch"] == 1 and "hook" in saved
    return _fit(store_path, case, EPOCHS, checkpoint=ckpt)


def _same_value(a, b) -> bool:
    return (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)) or a == b


def same_state(a, b) -> bool:
    """Nested hook state dicts equal: tensors bit for bit, floats with NaN equal to NaN."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and _same_value(a, b)


def same_run(a, b) -> bool:
    """Bit-for-bit: history (NaN equals NaN), best epoch and best weights."""
    if len(a.history) != len(b.history) or a.best_epoch != b.best_epoch:
        return False
    for ea, eb in zip(a.history, b.history):
        if ea.keys() != eb.keys() or not all(_same_value(ea[k], eb[k]) for k in ea):
            return False
    return a.best_state.keys() == b.best_state.keys() and all(
        torch.equal(v, b.best_state[k]) for k, v in a.best_state.items())


_straight: dict[str, object] = {}


def straight_run(store_path, case: str):
    if case not in _straight:
        _straight[case] = _fit(store_path, case, EPOCHS)
    return _straight[case]


@pytest.mark.parametrize("case", list(CASES))
def test_resumed_run_matches_uninterrupted(tiny_store, tmp_path, case):
    straight, straight_state = straight_run(tiny_store, case)
    assert straight.epochs_run == EPOCHS
    resumed, resumed_state = _interrupted(tiny_store, case, tmp_path / "last.ckpt")
    assert resumed.epochs_run == EPOCHS
    assert same_run(resumed, straight), (resumed.history, straight.history)
    assert same_state(resumed_state, straight_state)  # the hooks end in the same state too


@pytest.mark.parametrize("case", [c for c in CASES if c != "joint"])
def test_resume_without_the_hook_state_diverges(tiny_store, tmp_path, case, monkeypatch):
    """Control: the test above notices a hook whose state is not restored (every hook here keeps some)."""
    hook_cls = type(make_hook(case))
    monkeypatch.setattr(hook_cls, "load_state_dict", lambda self, state: None)
    straight, straight_state = straight_run(tiny_store, case)
    resumed, resumed_state = _interrupted(tiny_store, case, tmp_path / "last.ckpt")
    assert not (same_run(resumed, straight) and same_state(resumed_state, straight_state))


@pytest.mark.parametrize("direction", ["weights", "gradients"])
def test_cggm_on_segmentation_resumes_step_for_step(direction):
    """CGGM's decoder probes and its direction term on the 3-D U-Net, through a weights-only checkpoint
    taken between two steps, as the loop does between epochs."""
    def set_up(seed):
        model = tiny_model(seed)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        hook = CGGM(direction=direction, seg_magnitude=True, cls_optim="SGD", cls_lr=6e-3, cls_momentum=0.9)
        hook.setup(model, segmentation_loss, optimizer)
        return model, optimizer, hook

    def step(model, optimizer, hook, batch):
        out = model(batch)
        loss = hook.loss(model, batch, out, segmentation_loss(out.pred, batch.y))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        hook.after_backward(model, batch, out)
        optimizer.step()

    data = batches(4)
    straight = set_up(0)
    for batch in data:
        step(*straight, batch)

    first = set_up(0)
    for batch in data[:2]:
        step(*first, batch)
    buffer = io.BytesIO()
    model, optimizer, hook = first
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "hook": hook.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = set_up(1)  # other initial weights: everything must come from the checkpoint
    model, optimizer, hook = resumed
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    hook.load_state_dict(saved["hook"])
    for batch in data[2:]:
        step(*resumed, batch)

    for k, v in straight[0].state_dict().items():
        assert torch.equal(v, resumed[0].state_dict()[k]), k
    assert same_state(straight[2].state_dict(), resumed[2].state_dict())
