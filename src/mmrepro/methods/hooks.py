"""Training hooks: extra losses and gradient modulation around the one shared training step.

The shared loop calls ``hook.setup`` once (with the model, its task loss and its optimizer), then
per step: ``forward -> task loss -> hook.loss -> backward -> hook.after_backward -> gradient
clipping -> optimizer step``, and ``hook.on_epoch_end`` once per epoch (with the validation
loader) for the values to log, such as per-modality utilisation. A hook that trains modules of
its own (unimodal classifiers, prototypes) owns them and their optimizer. The trivial member,
``joint``, is plain joint training: it changes nothing.

A hook whose state carries over from step to step or epoch to epoch (modules, optimizers, running
statistics, epoch counters) returns it from ``state_dict`` and takes it back in
``load_state_dict``: the loop stores it in its resumable checkpoint after every epoch and, on
resume, loads it right after ``setup`` (which builds the modules and optimizers the state is
loaded into) and after the model's and the optimizer's own state. The state must hold only what
``torch.load(..., weights_only=True)`` reads back: tensors, dicts, lists, tuples, strings, numbers,
bools and ``None`` (modules and optimizers through their ``state_dict``).
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
    #: True when its per-modality parts are the modality encoders' transformers (see ModelTransform's).
    needs_modality_layers = False

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

    def run_summary(self) -> dict[str, float]:
        """Run-level counts the hook adds to ``metrics.json`` (under ``hook``), e.g. CGGM's extreme
        coefficient steps. Default: none."""
        return {}

    def state_dict(self) -> dict:
        """The hook's state that carries over between steps and epochs, for the loop's resumable
        checkpoint (only weights-only-loadable objects; see the module docstring). Default: none."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned; called after :meth:`setup` on resume. Default: nothing."""


@HOOKS.register("joint")
class JointTraining(TrainingHook):
    """Plain joint training: all modalities optimised together on the task loss, nothing modulated."""
