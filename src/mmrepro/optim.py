"""Optimisers and learning-rate schedules the papers' training scripts use, chosen by config keys.

The official scripts differ per dataset: CGGM's MOSI/IEMOCAP runs use Adam with MulT's
``ReduceLROnPlateau`` on the validation loss (patience ``when``, factor 0.1), its Food-101 run
AdamW, its BraTS run SGD (momentum 0.9) with a linear warm-up then a cosine decay set before every
optimizer step (``cosine_step``). The other schedules step once per epoch, after validation; all
depend only on the epoch (and the step within it), so a resumed run continues the same schedule.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("none", "plateau", "cosine", "cosine_step")


def build_optimizer(params: Iterable[torch.nn.Parameter], name: str, *, lr: float, weight_decay: float,
                    momentum: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; known: {OPTIMIZERS}")


class EpochSchedule:
    """A per-epoch learning-rate schedule: ``step(valid_loss)`` after each epoch.

    ``plateau``: multiply the rate by ``factor`` when the validation loss has not improved for
    ``when`` epochs (torch's ``ReduceLROnPlateau``). ``cosine``: ``warmup_epochs`` epochs rising
    linearly from ``warmup_lr`` to ``lr``, then a cosine from ``lr`` down to ``min_lr`` at the last
    epoch. ``cosine_step``: the same shape per optimizer step, as CGGM's ``cosine_scheduler``
    (``src/eval_metrics.py``, called by ``src/segtrain.py``): over the first
    ``warmup_epochs * steps_per_epoch`` steps evenly from ``warmup_lr`` to ``lr`` (both ends
    included), then for the remaining ``n`` steps ``min_lr + (lr - min_lr) (1 + cos(pi i / n)) / 2``,
    ``i = 0 .. n-1`` (the last step stays just above ``min_lr``); :meth:`before_step` sets it.
    ``none``: constant.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, name: str, *, lr: float, epochs: int, when: int,
                 factor: float, warmup_epochs: int, warmup_lr: float, min_lr: float, steps_per_epoch: int = 1):
        if name not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {name!r}; known: {SCHEDULERS}")
        self.optimizer, self.name = optimizer, name
        self.lr, self.epochs, self.warmup_epochs, self.warmup_lr, self.min_lr = lr, epochs, warmup_epochs, warmup_lr, min_lr
        self.plateau = (torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", patience=when, factor=factor)
                        if name == "plateau" else None)
        self.steps_per_epoch = steps_per_epoch
        self.epoch = 0
        if name == "cosine":
            self._set(self.rate(0))
        elif name == "cosine_step":
            self._set(self.step_rate(0))

    def step_rate(self, step: int) -> float:
        """The ``cosine_step`` rate of optimizer step ``step`` (0-based, counted over the whole run)."""
        warm = self.warmup_epochs * self.steps_per_epoch
        if step < warm:
            return self.warmup_lr + (self.lr - self.warmup_lr) * step / max(warm - 1, 1)
        n = max(self.epochs * self.steps_per_epoch - warm, 1)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * min(step - warm, n) / n))

    def before_step(self, index: int) -> None:
        """Called before the ``index``-th optimizer step of the current epoch (0-based)."""
        if self.name == "cosine_step":
            self._set(self.step_rate(self.epoch * self.steps_per_epoch + index))

    def rate(self, epoch: int) -> float:
        """The cosine schedule's rate for epoch ``epoch + 1`` (0-based count of finished epochs)."""
        if epoch < self.warmup_epochs:
            return self.warmup_lr + (self.lr - self.warmup_lr) * epoch / self.warmup_epochs
        span = max(self.epochs - self.warmup_epochs - 1, 1)
        progress = min((epoch - self.warmup_epochs) / span, 1.0)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress))

    def _set(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self, valid_loss: float) -> None:
        self.epoch += 1
        if self.plateau is not None:
            self.plateau.step(valid_loss)
        elif self.name == "cosine":
            self._set(self.rate(self.epoch))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "plateau": self.plateau.state_dict() if self.plateau else None}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        if self.plateau is not None:
            self.plateau.load_state_dict(state["plateau"])
