"""Small pieces several balance methods share."""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import nn

from mmrepro.data.loader import Batch
from mmrepro.methods.hooks import TrainingHook


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode inside the block; each one's own mode restored after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def keep_only(batch: Batch, keep: Collection[str]) -> Batch:
    """``batch`` with the inputs of every modality outside ``keep`` zeroed (lengths and ``present`` kept)."""
    return replace(batch, x={m: (v if m in keep else torch.zeros_like(v)) for m, v in batch.x.items()})


def per_modality(prefix: str, values: Mapping[str, float]) -> dict[str, float]:
    """``{"text": 0.5}`` -> ``{"<prefix>_text": 0.5}``: the naming of logged per-modality values."""
    return {f"{prefix}_{m}": float(v) for m, v in values.items()}


class EpochMeans:
    """Means over an epoch's steps of values logged once per step; :meth:`pop` returns and resets them."""

    def __init__(self) -> None:
        self.steps, self.sums = 0, {}

    def add(self, values: Mapping[str, float]) -> None:
        self.steps += 1
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)

    def pop(self) -> dict[str, float]:
        means = {k: s / self.steps for k, s in self.sums.items()} if self.steps else {}
        self.steps, self.sums = 0, {}
        return means

    def state_dict(self) -> dict:
        return {"steps": self.steps, "sums": dict(self.sums)}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.sums = int(state["steps"]), dict(state["sums"])


class EpochMeansHook(TrainingHook):
    """A hook whose only state across steps is the epoch's running means of the values it logs
    (``self._means``, popped at every epoch end)."""

    def setup(self, model: nn.Module, loss_fn, optimizer) -> None:
        self.loss_fn = loss_fn
        self._means = EpochMeans()

    def on_epoch_end(self, epoch: int, model: nn.Module, valid) -> dict[str, float]:
        return self._means.pop()

    def state_dict(self) -> dict:
        return {"means": self._means.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._means.load_state_dict(state["means"])
