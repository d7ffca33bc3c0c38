"""Baselines of the missing-modality study (MPLMM's Sec. 4.2) that need no backbone internals.

Why: under the ``missing`` and ``available`` data settings a missing modality's features are NaN
(see :mod:`mmrepro.methods.settings`), so a model must decide what to feed in their place. These
transforms decide it in front of any backbone, through a forward pre-hook that rewrites the
batch (no wrapper module: the state dict keeps the backbone's keys, so pretrained weights load
unchanged). They train every parameter, as the trivial transform does.

- ``modality_substitution`` (MS): a missing modality's input becomes a default value (zeros),
  in training and evaluation. The missing features are never read: ``torch.where`` selects the
  zeros, so perturbing them changes nothing.
- ``modality_dropout`` (MD): as MS, and while training each sample additionally loses, with
  probability ``rate``, the modalities absent from a pattern drawn uniformly among the
  incomplete non-empty ones (the missing protocol applied on the fly, on top of the data's own
  missing modalities; a sample is never left with none). Evaluation is MS.
- ``lower_bound`` (LB): MS for a model trained and tested on one available set only; the set is
  the ``available`` data setting's, so the study runs one LB model per available set.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from mmrepro.data.loader import Batch
from mmrepro.data.missing import incomplete_patterns
from mmrepro.methods.params import Fraction
from mmrepro.methods.registry import TRANSFORMS
from mmrepro.methods.transforms import FullFinetune


def substitute(batch: Batch, keep: torch.Tensor) -> Batch:
    """The batch with every modality ``i`` of a sample with ``keep[:, i]`` False set to zeros."""
    x = {}
    for i, (m, v) in enumerate(batch.x.items()):
        k = keep[:, i].view(-1, *[1] * (v.dim() - 1))
        x[m] = torch.where(k, v, torch.zeros((), dtype=v.dtype, device=v.device))
    return replace(batch, x=x, present=keep)


def dropout_keep(present: torch.Tensor, rate: float) -> torch.Tensor:
    """``present`` less, for each sample with probability ``rate``, the modalities absent from a pattern
    drawn uniformly among the incomplete non-empty ones; a sample is never left with none."""
    patterns = torch.from_numpy(incomplete_patterns(present.shape[1], "any")).to(present.device)
    if rate == 0.0 or len(patterns) == 0:  # one modality: nothing can be dropped
        return present
    b = present.shape[0]
    drawn = patterns[torch.randint(len(patterns), (b,), device=present.device)]
    dropped = torch.rand(b, device=present.device) < rate
    keep = present & torch.where(dropped.unsqueeze(1), drawn, torch.ones_like(drawn))
    return torch.where(keep.any(1, keepdim=True), keep, present)


@TRANSFORMS.register("modality_substitution")
class ModalitySubstitution(FullFinetune):
    """MS: missing inputs replaced by zeros at train and test time; every parameter trains."""

    def keep(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Which modalities the model sees for each sample (``(B, M)``)."""
        return batch.present

    def apply(self, model: nn.Module) -> nn.Module:
        model = super().apply(model)
        model.register_forward_pre_hook(lambda mod, args: (substitute(args[0], self.keep(mod, args[0])), *args[1:]))
        return model


@TRANSFORMS.register("modality_dropout")
class ModalityDropout(ModalitySubstitution):
    """MD: MS plus random modality dropout at ``rate`` while training (see the module docstring)."""

    def __init__(self, rate: Fraction = 0.7):
        self.rate = rate

    def keep(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return dropout_keep(batch.present, self.rate) if model.training else batch.present


@TRANSFORMS.register("lower_bound")
class LowerBound(ModalitySubstitution):
    """LB: MS on a model that only ever sees one available set (pair it with the ``available`` setting)."""
