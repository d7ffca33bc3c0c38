"""Utilisation tracking for any training hook: unimodal probes trained beside the model.

The balance study compares how much each modality's encoder learns under every method, not only
under CGGM (whose classifiers already measure it). :class:`UtilisationTracking` wraps a hook,
trains :class:`~mmrepro.methods.balance.probes.UnimodalProbes` on the detached encoder tokens
after each backward pass, and adds each probe's validation accuracy, ``util_<modality>``, to the
hook's per-epoch values. Measuring must not perturb: the probes see detached tokens and draw
their random numbers from a forked generator, so a run with tracking trains bit-for-bit the same
model as one without. The fork starts from the global generator's state at each call (and leaves
it as it was), so the probes have no generator of their own to keep: their resumable state is
their weights and optimizer, next to the wrapped hook's state.
"""

from __future__ import annotations

import torch
from torch import nn

from mmrepro.data.loader import Batch, SplitLoader
from mmrepro.methods.balance.probes import UnimodalProbes
from mmrepro.methods.hooks import TrainingHook
from mmrepro.models.multimodal import ModelOutput


def _own_rng():
    """Fork the global generators so the probes' randomness leaves the model's stream untouched."""
    return torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else [])


class UtilisationTracking(TrainingHook):
    """``inner`` plus probes; ``probe_layers`` sets the probes' transformer depth (1: cheap, enough to measure)."""

    def __init__(self, inner: TrainingHook, probe_layers: int = 1):
        self.inner, self.probe_layers = inner, probe_layers
        self.name = inner.name

    def setup(self, model: nn.Module, loss_fn, optimizer: torch.optim.Optimizer) -> None:
        self.inner.setup(model, loss_fn, optimizer)
        self.loss_fn = loss_fn
        with _own_rng():
            self.probes = UnimodalProbes.for_model(model, layers=self.probe_layers)

    def loss(self, model: nn.Module, batch: Batch, out: ModelOutput, task_loss: torch.Tensor) -> torch.Tensor:
        return self.inner.loss(model, batch, out, task_loss)

    def after_backward(self, model: nn.Module, batch: Batch, out: ModelOutput) -> None:
        self.inner.after_backward(model, batch, out)
        with _own_rng():
            self.probes.step(out, batch, self.loss_fn)

    def on_epoch_end(self, epoch: int, model: nn.Module, valid: SplitLoader) -> dict[str, float]:
        util = {f"util_{m}": v for m, v in self.probes.evaluate(model, valid).items()}
        return {**self.inner.on_epoch_end(epoch, model, valid), **util}

    def run_summary(self) -> dict[str, float]:
        return self.inner.run_summary()

    def state_dict(self) -> dict:
        """The wrapped hook's state, the probes' weights and their optimizer."""
        return {"inner": self.inner.state_dict(), "probes": self.probes.state_dict(),
                "probe_optimizer": self.probes.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["inner"])
        self.probes.load_state_dict(state["probes"])
        self.probes.optimizer.load_state_dict(state["probe_optimizer"])


def with_utilisation(hook: TrainingHook) -> TrainingHook:
    """``hook`` wrapped in probes, unless it measures utilisation itself (CGGM)."""
    return hook if hook.tracks_utilisation else UtilisationTracking(hook)
