"""The shared training loop: determinism, early stopping, resuming, and where hooks act."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from mmrepro import reproducibility
from mmrepro.data.loader import SplitLoader
from mmrepro.data.store import FeatureStore
from mmrepro.methods.hooks import JointTraining, TrainingHook
from mmrepro.models import build_model
from mmrepro.train import TrainConfig, fit

MODEL = dict(backbone="late", d_model=8, layers=1, heads=2, kernel=3, dropout=0.1, fusion_layers=1)


def _setup(store_path, task="main", seed=0):
    reproducibility.configure(seed, 1)
    store = FeatureStore(store_path)
    loaders = [SplitLoader(store.open_split(s), store.schema, task, batch_size=128, shuffle=s == "train", seed=seed)
               for s in ("train", "valid")]
    return build_model(store.schema, store.schema.task(task), **MODEL), *loaders


def _cfg(**kw):
    return TrainConfig(**{"epochs": 3, "batch_size": 128, "lr": 1e-3, "patience": 5, "device": "cpu", **kw})


def test_configure_turns_on_deterministic_kernels_without_loading_the_compiler():
    """The flag the kernels read is on, and a job does not pay ~3 s to import TorchInductor."""
    code = ("import sys, torch; from mmrepro import reproducibility; reproducibility.configure(0, 1); "
            "print(torch.are_deterministic_algorithms_enabled(), 'torch._inductor' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False"]


@pytest.mark.parametrize("task", ["main", "main_cls"])
def test_same_seed_gives_identical_weights_and_history(synth_store, task):
    runs = []
    for _ in range(2):
        model, train, valid = _setup(synth_store, task)
        runs.append(fit(model, train, valid, JointTraining(), _cfg()))
    assert runs[0].history == runs[1].history
    for k, v in runs[0].best_state.items():
        assert torch.equal(v, runs[1].best_state[k]), k
    model, train, valid = _setup(synth_store, task, seed=1)
    other = fit(model, train, valid, JointTraining(), _cfg())
    assert other.history != runs[0].history


def test_training_lowers_validation_loss(synth_store):
    model, train, valid = _setup(synth_store)
    result = fit(model, train, valid, JointTraining(), _cfg(epochs=4))
    assert result.history[-1]["valid_loss"] < result.history[0]["valid_loss"]


def test_early_stopping_after_patience(synth_store):
    # lr 1e-9 moves the validation loss by rounding noise only (a few ULPs, sign depending on the
    # CPU and BLAS): with min_delta far above that, no epoch after the first counts as better
    model, train, valid = _setup(synth_store)
    result = fit(model, train, valid, JointTraining(), _cfg(epochs=20, lr=1e-9, patience=2, min_delta=1e-3))
    assert result.best_epoch == 1
    assert result.epochs_run == 3


def test_min_delta_does_not_stop_real_progress(synth_store):
    # a real learning rate improves the loss by far more than min_delta: training is not cut short
    model, train, valid = _setup(synth_store)
    result = fit(model, train, valid, JointTraining(), _cfg(epochs=3, patience=1, min_delta=1e-3))
    assert result.epochs_run == 3 and result.best_epoch >= 2


class _Interrupt(Exception):
    pass


def test_resume_after_interruption_matches_an_uninterrupted_run(synth_store, tmp_path):
    model, train, valid = _setup(synth_store)
    straight = fit(model, train, valid, JointTraining(), _cfg(epochs=4))

    def crash_at_3(epoch, values):
        if epoch == 3:
            raise _Interrupt

    ckpt = tmp_path / "last.ckpt"
    model, train, valid = _setup(synth_store)
    with pytest.raises(_Interrupt):
        fit(model, train, valid, JointTraining(), _cfg(epochs=4), log_epoch=crash_at_3, checkpoint=ckpt,
            checkpoint_key="k")
    assert torch.load(ckpt)["state"]["epoch"] == 2
    model, train, valid = _setup(synth_store)
    resumed = fit(model, train, valid, JointTraining(), _cfg(epochs=4), checkpoint=ckpt, checkpoint_key="k")
    assert resumed.history == straight.history
    # a checkpoint written for another run spec is ignored, not resumed
    model, train, valid = _setup(synth_store)
    fresh = fit(model, train, valid, JointTraining(), _cfg(epochs=1), checkpoint=ckpt, checkpoint_key="other")
    assert len(fresh.history) == 1


class _Spy(TrainingHook):
    """Zeroes every gradient after backward and adds a term to the loss: proves where the loop calls hooks."""

    def __init__(self):
        self.calls = []

    def setup(self, model, loss_fn, optimizer):
        self.calls.append("setup")

    def loss(self, model, batch, out, task_loss):
        self.calls.append("loss")
        return task_loss + 0.0 * out.pred.sum()

    def after_backward(self, model, batch, out):
        self.calls.append("after_backward")
        for p in model.parameters():
            if p.grad is not None:
                assert p.grad.abs().sum() >= 0
                p.grad.zero_()

    def on_epoch_end(self, epoch, model, valid):
        return {"spy_epoch": float(epoch)}


def test_hooks_run_between_backward_and_the_optimizer_step(synth_store):
    model, train, valid = _setup(synth_store)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spy = _Spy()
    result = fit(model, train, valid, spy, _cfg(epochs=1))
    assert spy.calls[:3] == ["setup", "loss", "after_backward"]
    assert result.history[0]["spy_epoch"] == 1.0
    for k, v in model.state_dict().items():  # zeroed gradients -> Adam makes no update
        assert torch.equal(v, before[k]), k


def test_bf16_precision_trains_in_bfloat16_and_keeps_float32_weights(synth_store):
    model, train, valid = _setup(synth_store)
    seen = []
    model.head.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    result = fit(model, train, valid, JointTraining(), _cfg(epochs=2, precision="bf16"))
    assert torch.bfloat16 in seen  # the head's matmul ran under autocast
    assert all(v.dtype == torch.float32 for v in result.best_state.values() if v.is_floating_point())
    assert all(math.isfinite(h["valid_loss"]) for h in result.history)
    with pytest.raises(ValueError, match="train.precision"):
        fit(*_setup(synth_store), JointTraining(), _cfg(precision="fp8"))


def test_pinned_copy_is_a_no_op_off_cuda(synth_store):
    _, train, _ = _setup(synth_store)
    batch = next(iter(train))
    moved = batch.to("cpu", pin=True)
    assert all(torch.equal(moved.x[m], batch.x[m]) for m in batch.x) and torch.equal(moved.y, batch.y)
