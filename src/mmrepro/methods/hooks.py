"""Training hooks: extra losses and gradient modulation around the one shared training step.

The shared loop calls ``hook.setup`` once (with the model, its task loss and its optimizer), then
per step: ``forward -> task loss -> hook.loss -> backward -> hook.after_backward -> gradient
clipping -> optimizer step``, and ``hook.on_epoch_end`` once per epoch (with the validation
loader) for the values to log, such as per-modality utilisation. A hook that trains modules of
its own (unimodal classifiers, prototypes) owns them and their optimizer. The trivial member,
``joint``, is plain joint training: it changes nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from mmrepro.data.loader import Batch, SplitLoader
from mmrepro.methods.registry import HOOKS
from mmrepro.models.multimodal import ModelOutput


class TrainingHook:
    name = "base"
    #: True when the hook logs ``util_<modality>`` itself (e.g. CGGM's unimodal classifiers).
    tracks_utilisation = False

    def setup(self, model: nn.Module, loss_fn, optimizer: torch.optim.Optimizer) -> None:
        """Called once before training, with the model, its task loss function and its optimizer."""

    def loss(self, model: nn.Module, batch: Batch, out: ModelOutput, task_loss: torch.Tensor) -> torch.Tensor:
        """The loss to back-propagate; the default is the task loss."""
        return task_loss

    def after_backward(self, model: nn.Module, batch: Batch, out: ModelOutput) -> None:
        """Modulate gradients in place before the optimizer step."""

    def on_epoch_end(self, epoch: int, model: nn.Module, valid: SplitLoader) -> dict[str, float]:
        """Per-epoch values to log (logged with ``step=epoch``); ``valid`` is the validation loader."""
        return {}


@HOOKS.register("joint")
class JointTraining(TrainingHook):
    """Plain joint training: all modalities optimised together on the task loss, nothing modulated."""
