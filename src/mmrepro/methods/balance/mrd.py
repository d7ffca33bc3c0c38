"""MRD: modality random dropout, a baseline of the CGGM paper (its Sec. 4.3 lists it without a
reference implementation; described in ``../shared/specs/cggm.md``).

During training every modality of every sample is dropped independently with probability ``p``:
its input is zeroed (as the ``zero_fill`` setting makes a missing modality) and its ``present``
flag cleared; a sample that would lose all its modalities keeps one, drawn uniformly. Evaluation
sees complete data. The model learns not to lean on one modality because that modality is
sometimes absent. ``p = 0.5`` is our default (the paper gives no rate).

A model transform, because it changes what the model sees rather than the loss or gradients: it
registers a forward pre-hook on the model that acts only in training mode, so any backbone and any
training hook (``mrd+cggm``) can use it. The draws come from torch's global generator, which the
loop's resumable checkpoint keeps. All parameters stay trainable.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from mmrepro.data.loader import Batch
from mmrepro.methods.params import Rate
from mmrepro.methods.registry import TRANSFORMS
from mmrepro.methods.transforms import ModelTransform


def drop_modalities(batch: Batch, p: float) -> Batch:
    """``batch`` with each (sample, modality) dropped with probability ``p``, at least one kept per sample."""
    names = list(batch.x)
    n, m = len(batch), len(names)
    device = batch.present.device
    keep = torch.rand(n, m, device=device) >= p
    none = ~keep.any(dim=1)
    if none.any():
        keep[none, torch.randint(m, (int(none.sum()),), device=device)] = True
    x = {k: v * keep[:, i].view(-1, *[1] * (v.dim() - 1)).to(v.dtype) for i, (k, v) in enumerate(batch.x.items())}
    present = batch.present & keep if batch.present.shape == keep.shape else batch.present
    return replace(batch, x=x, present=present)


class ModalityDropout:
    """Forward pre-hook: drop modalities of the batch while the model is training."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, module: nn.Module, args: tuple):
        if not module.training:
            return None
        return (drop_modalities(args[0], self.p), *args[1:])


@TRANSFORMS.register("mrd")
class MRD(ModelTransform):
    """Modality random dropout at rate ``p`` in training (see the module docstring)."""

    def __init__(self, p: Rate = 0.5):
        self.p = float(p)

    def apply(self, model: nn.Module) -> nn.Module:
        for q in model.parameters():
            q.requires_grad_(True)
        model.register_forward_pre_hook(ModalityDropout(self.p))
        return model
