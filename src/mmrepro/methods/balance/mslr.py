"""MSLR: modality-specific learning rates (Yao & Mihalcea, Findings of ACL 2022), as a training hook.

What the original does, and what we could confirm
-------------------------------------------------
The paper builds additive late-fusion models from fine-tuned unimodal models and gives each
modality's parameters their own learning rate, because the best unimodal learning rates can
differ by orders of magnitude and one global rate starves some modalities of gradient. It
studies three ways to set those rates: **keep** (each modality keeps the rate that was best for
its unimodal model), **smooth** and **dynamic** (rates adjusted during training from each
modality's unimodal validation performance). We found no official code, and the paper's full
text was not in the stored sources we could search (only its abstract), so the smooth and dynamic
update rules below are *not* confirmed against the paper. The dynamic rule follows the one public
re-implementation we could read (an ``MSLRTrainer`` in a balanced-multimodal benchmark project,
found through the code search): keep the last ``period`` unimodal validation accuracies of each
modality and, every ``period`` epochs, multiply that modality's rate by
``current score / mean of those scores``. The smooth rule is our own per-epoch version of the same
signal (below). Treat both as provisional until checked against the paper.

What we implemented
-------------------
* **Parameter groups.** ``setup`` rebuilds the optimizer's groups in place: every parameter of
  ``model.encoders[m]`` is taken out of the group(s) it was in and put in a new group for ``m``
  (tagged ``group["modality"] = m``) that copies the hyperparameters of the group it came from
  (betas, eps, weight decay, ...) except ``lr``. Optimizer state is keyed by the parameter
  tensors, so Adam's moments move with the parameters untouched. The rebuilt layout is the same
  on every call, so the loop's checkpoint (saved after ``setup``) resumes into matching groups.
  Everything that is not an encoder (fusion, head) keeps the global rate.
* **Resuming.** The rates live in the optimizer's groups (restored with the optimizer, which puts
  new group dicts in place: ``load_state_dict`` finds each modality's group again by its tag);
  the score windows are the hook's state (``state_dict``).
* **Initial rates.** ``lrs`` maps modality -> learning rate (the unimodal optimum, chosen by the
  user from unimodal runs); a modality missing from ``lrs`` starts at the global rate.
* **keep:** the initial rates, fixed.
* **dynamic:** with ``s_m(t)`` the unimodal validation score of modality ``m`` after epoch ``t``
  (1-based) and ``H_m(t)`` the last ``period`` scores (``t`` included): on every epoch with
  ``t % period == 0``, ``lr_m <- lr_m * s_m(t) / mean(H_m(t))``.
* **smooth** (our construction): the same ratio applied every epoch, spread over the window,
  ``lr_m <- lr_m * (s_m(t) / mean(H_m(t))) ** (1 / period)``, so ``period`` smooth steps compound to
  about one dynamic step without the jumps.
* ``period`` must be at least 2 (a one-score window always gives the ratio 1). An update is
  skipped for a modality whose score or window mean is not positive (or is infinite).
* **Unimodal validation score.** The model (in eval mode, no gradient) is run on each validation
  batch with every other modality's inputs set to zero (``dataclasses.replace`` on the ``Batch``;
  lengths kept, ``present`` set False for the zeroed modalities, as the ``zero_fill`` setting does).
  The score is accuracy for classification and ``1 / MAE`` for regression (positive and larger
  when better, so the ratio reads the same way as for accuracy). The paper's late-fusion model sums
  unimodal predictions, so there a unimodal prediction is exact; for our fused backbones, zeroing
  the other inputs is the stand-in.

Logged per epoch: ``lr_<m>`` (the rate in force for the next epoch) and ``mslr_score_<m>``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace
from typing import Annotated

import torch
from torch import nn

from mmrepro.data.loader import Batch, SplitLoader
from mmrepro.methods.hooks import TrainingHook
from mmrepro.methods.params import OneOf, Positive, Range
from mmrepro.methods.registry import HOOKS
from mmrepro.models.multimodal import ModelOutput

VARIANTS = ("keep", "smooth", "dynamic")


def only_modality(batch: Batch, keep: str) -> Batch:
    """The batch with every modality but ``keep`` zeroed (inputs times 0; lengths unchanged)."""
    names = list(batch.x)
    x = {m: (v if m == keep else torch.zeros_like(v)) for m, v in batch.x.items()}
    present = batch.present.clone()
    if present.dim() == 2 and present.shape[1] == len(names):
        for i, m in enumerate(names):
            if m != keep:
                present[:, i] = False
    return replace(batch, x=x, present=present)


def split_encoder_groups(optimizer: torch.optim.Optimizer, model: nn.Module,
                         lrs: dict[str, float]) -> dict[str, dict]:
    """Move each encoder's parameters into a group of its own with learning rate ``lrs[m]``; return the groups."""
    owner = {id(p): m for m in model.names for p in model.encoders[m].parameters()}
    template: dict[str, dict] = {}
    moved: dict[str, list[torch.nn.Parameter]] = {m: [] for m in model.names}
    kept_groups = []
    for group in optimizer.param_groups:
        rest = []
        for p in group["params"]:
            m = owner.get(id(p))
            if m is None:
                rest.append(p)
            else:
                moved[m].append(p)
                template.setdefault(m, {k: v for k, v in group.items() if k != "params"})
        if rest:
            group["params"] = rest
            kept_groups.append(group)
    optimizer.param_groups[:] = kept_groups
    groups = {}
    for m in model.names:
        if not moved[m]:
            continue
        optimizer.add_param_group({**template[m], "params": moved[m], "lr": float(lrs[m]), "modality": m})
        groups[m] = optimizer.param_groups[-1]
    return groups


@torch.no_grad()
def unimodal_scores(model: nn.Module, loader: SplitLoader,
                    device: str | torch.device | None = None) -> dict[str, float]:
    """Each modality's validation score with the others zeroed: accuracy (classes) or 1 / MAE (regression)."""
    was_training = model.training
    model.eval()
    if device is None:
        device = next(model.parameters()).device
    hits = {m: 0.0 for m in model.names}
    err = {m: 0.0 for m in model.names}
    n = 0
    for batch in loader:
        batch = batch.to(device)
        for m in model.names:
            pred = model(only_modality(batch, m)).pred
            if model.task_type == "regression":
                err[m] += float((pred - batch.y).abs().sum())
            else:
                hits[m] += float((pred.argmax(-1) == batch.y).sum())
        n += len(batch)
    model.train(was_training)
    if model.task_type == "regression":
        return {m: (n / err[m] if err[m] > 0 else float("inf")) for m in model.names}
    return {m: hits[m] / max(n, 1) for m in model.names}


def update_factor(history: list[float], variant: str, epoch: int, period: int) -> float:
    """The multiplier of a modality's learning rate after ``epoch`` given its recent scores (last = current)."""
    if variant == "keep" or not history:
        return 1.0
    current, mean = history[-1], sum(history) / len(history)
    if not (current > 0 and mean > 0) or current == float("inf") or mean == float("inf"):
        return 1.0
    if variant == "dynamic":
        return current / mean if epoch % period == 0 else 1.0
    return (current / mean) ** (1.0 / period)


@HOOKS.register("mslr")
class ModalitySpecificLearningRates(TrainingHook):
    """Per-modality encoder learning rates: fixed (keep) or adjusted from unimodal validation scores."""

    def __init__(self, variant: Annotated[str, OneOf(VARIANTS)] = "keep", lrs: dict[str, Positive] | None = None,
                 period: Annotated[int, Range(2)] = 5):  # a window of one score gives the ratio 1: rates never move
        self.variant, self.lrs, self.period = variant, dict(lrs or {}), period
        self.groups: dict[str, dict] = {}
        self.history: dict[str, deque] = {}

    def setup(self, model: nn.Module, loss_fn, optimizer: torch.optim.Optimizer) -> None:
        unknown = sorted(set(self.lrs) - set(model.names))
        if unknown:
            raise ValueError(f"mslr.lrs names modalities the model does not have: {unknown}; it has {model.names}")
        base = optimizer.param_groups[0]["lr"]
        lrs = {m: self.lrs.get(m, base) for m in model.names}
        self.groups = split_encoder_groups(optimizer, model, lrs)
        self.history = {m: deque(maxlen=self.period) for m in model.names}
        self._optimizer = optimizer

    def state_dict(self) -> dict:
        """The window of recent unimodal scores per modality (the rates are in the optimizer's state)."""
        return {"history": {m: list(h) for m, h in self.history.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.history = {m: deque(h, maxlen=self.period) for m, h in state["history"].items()}
        # the optimizer's load_state_dict replaced its group dicts: point at the ones in use
        optimizer = getattr(self, "_optimizer", None)
        if optimizer is not None:
            self.groups = {g["modality"]: g for g in optimizer.param_groups if "modality" in g}

    def lr(self, m: str) -> float:
        return float(self.groups[m]["lr"])

    def apply_scores(self, epoch: int, scores: dict[str, float]) -> None:
        """Record this epoch's unimodal scores and update the rates of the smooth / dynamic variants."""
        for m, s in scores.items():
            self.history[m].append(s)
            if m in self.groups:
                factor = update_factor(list(self.history[m]), self.variant, epoch, self.period)
                self.groups[m]["lr"] = self.lr(m) * factor

    def on_epoch_end(self, epoch: int, model: nn.Module, valid: SplitLoader) -> dict[str, float]:
        scores = unimodal_scores(model, valid)
        self.apply_scores(epoch, scores)
        values = {f"lr_{m}": self.lr(m) for m in self.groups}
        values.update({f"mslr_score_{m}": s for m, s in scores.items()})
        return values

    def loss(self, model: nn.Module, batch: Batch, out: ModelOutput, task_loss: torch.Tensor) -> torch.Tensor:
        return task_loss
