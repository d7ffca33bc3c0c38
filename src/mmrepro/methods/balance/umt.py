"""UMT: uni-modal teachers (Du et al., "On Uni-Modal Feature Learning in Supervised Multi-Modal
Learning", ICML 2023), as a training hook.

What the paper does (the authors' code was not found in the stored index; from the paper and
``../shared/specs/cggm.md``): first train one unimodal model per modality; then train the
multimodal model on its task loss plus, for every modality, a feature-distillation loss (mean
squared error) between the multimodal model's encoder output for that modality and the frozen
unimodal teacher's, so that each encoder keeps the unimodal features joint training tends to
neglect while the fusion learns the cross-modal part.

Here the teachers are the balance grid's own unimodal runs: the ``subset`` settings with one
modality trained with ``joint`` (``only_text``, ...), same dataset and seed. The pipeline makes
each UMT run depend on those runs' ``model.pt`` (``mmrepro.config.teacher_runs``); the job loads
them, frozen and in eval mode, and passes them in as ``teachers`` (modality -> model). The
distilled features are the pooled encoder outputs (``ModelOutput.features``, masked mean of the
tokens) of student and teacher; ``weight`` (1 by default) scales the summed MSE terms.

Logged per epoch: ``umt_distill_<m>``, the mean distillation loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmrepro.data.loader import Batch
from mmrepro.methods.balance.common import EpochMeansHook, per_modality
from mmrepro.methods.params import NonNegative
from mmrepro.methods.registry import HOOKS
from mmrepro.models.multimodal import ModelOutput


@HOOKS.register("umt")
class UMT(EpochMeansHook):
    """Task loss + ``weight`` * sum over modalities of MSE(student features, frozen teacher features)."""

    #: the job passes ``teachers`` (modality -> trained unimodal model) to this hook
    needs_teachers = True

    def __init__(self, weight: NonNegative = 1.0, teachers: dict[str, nn.Module] | None = None):
        self.weight = float(weight)
        self.teachers = dict(teachers or {})

    def setup(self, model: nn.Module, loss_fn, optimizer: torch.optim.Optimizer) -> None:
        missing = [m for m in model.names if m not in self.teachers]
        if missing:
            raise ValueError(f"umt: no unimodal teacher for {missing}; the balance study needs a one-modality "
                             f"'subset' setting trained with 'joint' for every modality")
        ref = next(model.parameters())
        for m in model.names:
            self.teachers[m] = self.teachers[m].to(ref.device).eval().requires_grad_(False)
        super().setup(model, loss_fn, optimizer)

    def loss(self, model: nn.Module, batch: Batch, out: ModelOutput, task_loss: torch.Tensor) -> torch.Tensor:
        distill = {}
        for m in model.names:
            with torch.no_grad():
                target = self.teachers[m](batch).features[m]
            distill[m] = F.mse_loss(out.features[m], target)
        self._means.add(per_modality("umt_distill", {m: float(v.detach()) for m, v in distill.items()}))
        return task_loss + self.weight * sum(distill.values())
