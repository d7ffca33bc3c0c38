"""ReconBoost: boosting that alternates between modalities (Hua et al., "ReconBoost: Boosting Can
Achieve Modality Reconcilement", ICML 2024), as a training hook on the ``late_boost`` model.

What the official code does (``huacong/ReconBoost``: ``train.py``, ``models/dynamic_net.py``;
read, not copied). The model is an ensemble of unimodal learners whose logits are summed. Training
runs in stages; stage s picks one modality (alternating). Phase 1, ``epochs_per_stage`` (4)
epochs: only that modality's learner is updated, on a boosting loss per sample
``-(w1 - w2 * q) * log p_m(y) / K``, where ``p_m`` is the learner's softmax, ``q`` the softmax
probability of the true class under the *other* learners' summed logits (detached), K the number
of classes, ``w1 = 5``, ``w2 = 1``: samples the others already get right weigh less (the
"reconcilement" term). A "GA" term, the MSE between the detached softmaxes of the current and the
previous learner, is added with weight 0.5, but both sides are detached, so it has no gradient
and changes nothing: left out here. Phase 2, ``correct_epoch`` (4) epochs, "global rectification":
every learner is trained on the cross-entropy of the summed logits.

Here: ``late_boost`` gives each modality an encoder and a linear head (the learner); the stages
are counted in the loop's epochs (1-based): a cycle is ``stage_epochs`` boosting epochs for the
stage's modality (``model.names`` in turn) then ``correct_epochs`` rectification epochs on the
task loss of the ensemble. In boosting epochs the loss is the boosting loss and the gradients of
every other modality's encoder and head are dropped (``grad = None``, so Adam skips them) before
the shared optimizer's step; the code uses a fresh SGD optimizer per phase instead. Regression
(our adaptation; the code is classification only): ``q = exp(-|mean of the others - y|)`` and the
per-sample loss ``(w1 - w2 * q) * |p_m - y|``.

Logged per epoch: ``reconboost_stage`` (index of the boosted modality, -1 in rectification) and
``reconboost_loss``.
"""

from __future__ import annotations

import torch
from torch import nn

from mmrepro.data.loader import Batch
from mmrepro.methods.balance.common import EpochMeans
from mmrepro.methods.hooks import TrainingHook
from mmrepro.methods.params import Count, NonNegative, PositiveInt
from mmrepro.methods.registry import HOOKS
from mmrepro.models.multimodal import ModelOutput


def boosting_loss(pred: torch.Tensor, others: torch.Tensor, y: torch.Tensor, task_type: str,
                  w1: float, w2: float) -> torch.Tensor:
    """Mean over the batch of ReconBoost's per-sample boosting loss (see the module docstring)."""
    if task_type == "regression":
        q = torch.exp(-(others.detach() - y).abs())
        return ((w1 - w2 * q) * (pred - y).abs()).mean()
    q = others.detach().softmax(-1).gather(1, y.long()[:, None]).squeeze(1)
    logp = pred.log_softmax(-1).gather(1, y.long()[:, None]).squeeze(1)
    return (-(w1 - w2 * q) * logp / pred.shape[-1]).mean()


@HOOKS.register("reconboost")
class ReconBoost(TrainingHook):
    """Alternate boosting epochs of one modality's learner with rectification epochs of the ensemble."""

    transform = "late_boost"

    def __init__(self, stage_epochs: PositiveInt = 4, correct_epochs: Count = 4, weight1: NonNegative = 5.0,
                 weight2: NonNegative = 1.0):
        self.stage_epochs, self.correct_epochs = int(stage_epochs), int(correct_epochs)
        self.weight1, self.weight2 = float(weight1), float(weight2)
        self.epoch = 1
        self._means = EpochMeans()

    def setup(self, model: nn.Module, loss_fn, optimizer: torch.optim.Optimizer) -> None:
        self.epoch = 1
        self._means = EpochMeans()

    def boosted(self, names: list[str]) -> str | None:
        """The modality boosted in the current epoch, None in a rectification epoch."""
        cycle = self.stage_epochs + self.correct_epochs
        stage, pos = divmod(self.epoch - 1, cycle)
        return names[stage % len(names)] if pos < self.stage_epochs else None

    def loss(self, model: nn.Module, batch: Batch, out: ModelOutput, task_loss: torch.Tensor) -> torch.Tensor:
        names = list(model.names)
        m = self.boosted(names)
        if m is None or len(names) < 2:
            loss = task_loss
        else:
            preds, _ = model.unimodal(out.features)
            others = model.combine({k: preds[k] for k in names if k != m})
            loss = boosting_loss(preds[m], others, batch.y, model.task_type, self.weight1, self.weight2)
        self._means.add({"reconboost_stage": names.index(m) if m is not None else -1,
                         "reconboost_loss": float(loss.detach())})
        return loss

    def after_backward(self, model: nn.Module, batch: Batch, out: ModelOutput) -> None:
        m = self.boosted(list(model.names))
        if m is None or len(model.names) < 2:
            return
        for k in model.names:
            if k != m:
                for p in [*model.encoders[k].parameters(), *model.uni_heads[k].parameters()]:
                    p.grad = None

    def on_epoch_end(self, epoch: int, model: nn.Module, valid) -> dict[str, float]:
        self.epoch = epoch + 1
        return self._means.pop()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "means": self._means.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self._means.load_state_dict(state["means"])

