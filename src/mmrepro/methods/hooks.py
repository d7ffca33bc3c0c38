"""Training hooks: extra losses and gradient modulation around the one shared training step.

The shared loop calls, per step: ``forward -> task loss -> hook.loss -> backward ->
hook.after_backward -> optimizer step``, and ``hook.on_epoch_end`` once per epoch for the
values to log (for example per-modality utilisation). The trivial member, ``joint``, is plain
joint training: it changes nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from mmrepro.data.loader import Batch
from mmrepro.methods.registry import HOOKS
from mmrepro.models.multimodal import ModelOutput


class TrainingHook:
    name = "base"

    def setup(self, model: nn.Module, loss_fn) -> None:
        """Called once before training, with the model and its task loss function."""

    def loss(self, model: nn.Module, batch: Batch, out: ModelOutput, task_loss: torch.Tensor) -> torch.Tensor:
        """The loss to back-propagate; the default is the task loss."""
        return task_loss

    def after_backward(self, model: nn.Module, batch: Batch, out: ModelOutput) -> None:
        """Modulate gradients in place before the optimizer step."""

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        """Per-epoch values to log (logged with ``step=epoch``)."""
        return {}


@HOOKS.register("joint")
class JointTraining(TrainingHook):
    """Plain joint training: all modalities optimised together on the task loss, nothing modulated."""
