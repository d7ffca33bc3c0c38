"""UME: uni-modal ensemble (Du et al., "On Uni-Modal Feature Learning in Supervised Multi-Modal
Learning", ICML 2023), as a training hook on the ``late_mean`` model.

What the paper does: train one unimodal model per modality, each independently on its own
labels, and predict with the average of their outputs. (The authors' code was not found in the
stored index; this follows the paper and ``../shared/specs/cggm.md``.)

How it runs here, in one job: the ``late_mean`` transform gives every modality its own encoder
and linear head and predicts with the mean of the heads' outputs; this hook replaces the loss by
the *sum of the unimodal losses*. The modalities share no parameter, so the gradient each
encoder and head receives is exactly that of its own unimodal loss: the predictors train
independently, as the paper's ensemble members do (a test checks it). What they share is the
loop: one optimizer (per-parameter Adam state, so no coupling except gradient-norm clipping,
which is global), the learning-rate schedule, the epoch budget and early stopping, which watches
the ensemble's validation loss. The grid's separate unimodal runs (the ``subset`` settings) train
each modality with its own early stopping; their test numbers are the "unimodal" rows.

Logged per epoch: ``ume_loss_<m>``, the mean unimodal training loss.
"""

from __future__ import annotations

import torch
from torch import nn

from mmrepro.data.loader import Batch
from mmrepro.methods.balance.common import EpochMeansHook, per_modality
from mmrepro.methods.registry import HOOKS
from mmrepro.models.multimodal import ModelOutput


@HOOKS.register("ume")
class UME(EpochMeansHook):
    """Sum of the unimodal heads' losses: each modality's predictor trains on its own loss only."""

    transform = "late_mean"

    def loss(self, model: nn.Module, batch: Batch, out: ModelOutput, task_loss: torch.Tensor) -> torch.Tensor:
        preds, _ = model.unimodal(out.features)
        losses = {m: self.loss_fn(preds[m], batch.y) for m in model.names}
        self._means.add(per_modality("ume_loss", {m: float(v.detach()) for m, v in losses.items()}))
        return sum(losses.values())
