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


# --- train.selection: which epoch a run keeps -------------------------------------------------------

class _Scripted(torch.nn.Module):
    """Predicts, in eval mode, the scripted validation outputs of the current epoch (one row per epoch);
    trains a single weight so that the loop has something to step."""

    def __init__(self, task_type: str, outputs: list[list]):
        super().__init__()
        self.task_type, self.outputs, self.epoch = task_type, torch.tensor(outputs), 0
        self.w = torch.nn.Parameter(torch.zeros(()))

    def train(self, mode: bool = True):
        self.epoch += mode  # the loop calls train() once at the start of each epoch
        return super().train(mode)

    def forward(self, batch):
        from mmrepro.models.output import ModelOutput

        pred = self.outputs[self.epoch - 1][batch.index] + 0.0 * self.w
        if self.training:
            pred = pred + self.w
        return ModelOutput(pred=pred, fused=pred.reshape(len(batch), -1), tokens={}, features={})


def _batches(y: list):
    from mmrepro.data.loader import Batch

    y = torch.tensor(y)
    return [Batch(x={}, lengths={}, present=torch.ones(len(y), 1, dtype=torch.bool), y=y, index=torch.arange(len(y)))]


# Validation labels (one zero: the code counts it negative) and each epoch's predictions.
Y = [0.0, 1.0, -1.0, 2.0]
PRED = [[0.1, 0.9, -0.9, 1.9],     # L1 0.10, code Acc-2 0.75 (MMSA's acc2_has0: 1.0)
        [-0.5, 0.5, -0.5, 1.0],    # L1 0.625, code Acc-2 1.0 (acc2_has0: 0.75)
        [-0.1, 1.0, -1.0, 2.05],   # L1 0.0375 (the lowest), code Acc-2 1.0: a tie, not an improvement
        [0.2, 0.5, 0.5, 0.5]]      # L1 0.925, code Acc-2 0.5


@pytest.mark.parametrize("selection, best_epoch", [("valid_loss", 3), ("valid_accuracy", 2)])
def test_each_selection_keeps_the_epoch_its_rule_picks(selection, best_epoch):
    batches = _batches(Y)
    result = fit(_Scripted("regression", PRED), batches, batches, JointTraining(),
                 _cfg(epochs=4, patience=4, lr=0.0, selection=selection))
    assert result.best_epoch == best_epoch and result.epochs_run == 4
    assert [h.get("valid_accuracy") for h in result.history] == \
        ([0.75, 1.0, 1.0, 0.5] if selection == "valid_accuracy" else [None] * 4)
    assert [h["valid_loss"] for h in result.history] == pytest.approx([0.1, 0.625, 0.0375, 0.925])


def test_patience_counts_epochs_without_a_new_best_under_the_selection():
    batches = _batches(Y)
    result = fit(_Scripted("regression", PRED), batches, batches, JointTraining(),
                 _cfg(epochs=4, patience=1, lr=0.0, selection="valid_accuracy"))
    assert (result.best_epoch, result.epochs_run) == (2, 3)  # epoch 3 ties epoch 2's accuracy: patience ends


def test_accuracy_selection_on_classes_is_top1_and_never_keeps_accuracy_zero():
    batches = _batches([1, 0])
    logits = [[[0.0, 1.0], [0.0, 1.0]],   # top-1 0.5
              [[1.0, 0.0], [1.0, 0.0]],   # 0.5 again: not strictly better
              [[0.0, 1.0], [1.0, 0.0]]]   # 1.0
    result = fit(_Scripted("classification", logits), [_batches([1, 0])[0]], batches, JointTraining(),
                 _cfg(epochs=3, patience=3, lr=0.0, selection="valid_accuracy"))
    assert result.best_epoch == 3 and [h["valid_accuracy"] for h in result.history] == [0.5, 0.5, 1.0]
    wrong = [[[1.0, 0.0], [0.0, 1.0]]]  # accuracy 0: the code's best starts at 0, so nothing is kept
    assert fit(_Scripted("classification", wrong), batches, batches, JointTraining(),
               _cfg(epochs=1, lr=0.0, selection="valid_accuracy")).best_epoch == 0


def test_a_selection_the_task_cannot_score_is_refused_before_training():
    batches = _batches(Y)
    with pytest.raises(ValueError, match="train.selection must be one of"):
        fit(_Scripted("regression", PRED), batches, batches, JointTraining(), _cfg(selection="valid_acc"))
    with pytest.raises(ValueError, match="valid_accuracy needs a regression or classification task"):
        fit(_Scripted("segmentation", PRED), batches, batches, JointTraining(), _cfg(selection="valid_accuracy"))


def test_shuffle_false_trains_on_the_split_in_stored_order_every_epoch(synth_store):
    from dataclasses import replace

    from conftest import balance_spec
    from mmrepro.jobs import RunData

    def orders(shuffle: bool) -> list[list[int]]:
        spec = balance_spec()
        loader = RunData(synth_store, replace(spec, train=replace(spec.train, shuffle=shuffle))).train_loader()
        return [torch.cat([b.index for b in loader]).tolist() for _ in range(2)]

    stored = orders(False)
    assert stored[0] == stored[1] == list(range(len(stored[0])))
    shuffled = orders(True)  # the default: a new order per epoch
    assert shuffled[0] != shuffled[1] and sorted(shuffled[0]) == stored[0]
def test_max_steps_ends_each_epoch_after_that_many_steps_and_the_next_starts_afresh(synth_store):
    model, train, valid = _setup(synth_store)
    assert len(train) > 2   # 1500 samples in batches of 128
    spy = _Spy()
    result = fit(model, train, valid, spy, _cfg(epochs=2, max_steps=2))
    assert spy.calls.count("loss") == 4 and len(result.history) == 2
    assert train.epoch == 2   # each epoch drew its own order, as without the cap


def test_a_batch_norm_model_whose_last_batch_would_be_one_sample_is_refused_before_training(synth_store):
    """The rehearsal's BraTS run (deeplab2d, one training case) failed at its first step, and a real split of
    64k + 1 cases would fail after a whole epoch: refused up front, unless max_steps never reaches that batch."""
    reproducibility.configure(0, 1)
    store = FeatureStore(synth_store)
    train = SplitLoader(store.open_split("train"), store.schema, "main", batch_size=1499, shuffle=True, seed=0)  # 1499 + 1
    valid = SplitLoader(store.open_split("valid"), store.schema, "main", batch_size=128, shuffle=False, seed=0)
    model = build_model(store.schema, store.schema.task("main"), **MODEL)
    model.norm = torch.nn.BatchNorm1d(4)
    spy = _Spy()
    with pytest.raises(ValueError, match="train.batch_size 1499: the training split's 1500 samples end in a batch of one"):
        fit(model, train, valid, spy, _cfg(epochs=1))
    assert "loss" not in spy.calls
    fit(model, train, valid, spy, _cfg(epochs=1, max_steps=1))
    assert spy.calls.count("loss") == 1
