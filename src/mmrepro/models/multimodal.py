"""The shared multimodal model: per-modality encoders, a fusion backbone and a prediction head.

Its output (:class:`~mmrepro.models.output.ModelOutput`) exposes the intermediate representations
every method family needs: per-modality token sequences and pooled features (for unimodal
classifiers and gradient modulation), the fused representation (for adapters placed before the
head) and the prediction. :func:`mmrepro.models.build.build_model` builds it, or another backbone.
"""

from __future__ import annotations

import torch
from torch import nn

from mmrepro.data.loader import Batch
from mmrepro.data.schema import TaskSpec
from mmrepro.models.encoders import ModalityEncoder, masked_mean
from mmrepro.models.output import ModelOutput


class PredictionHead(nn.Module):
    """Residual two-layer MLP then a linear ``out`` layer (the layout of MulT's and CGGM's heads).

    ``hidden``: first map the input to that width with Linear + ReLU (CASP's late-fusion head,
    ``3d -> d``); the residual MLP and ``out`` then work at ``hidden``.
    """

    def __init__(self, in_dim: int, out_dim: int, dropout: float, hidden: int | None = None):
        super().__init__()
        if hidden is not None:
            self.pre = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU())
            in_dim = hidden
        self.mlp = nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(in_dim, in_dim))
        self.out = nn.Linear(in_dim, out_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "pre"):
            h = self.pre(h)
        return self.out(h + self.mlp(h))


class MultimodalModel(nn.Module):
    def __init__(self, encoders: dict[str, ModalityEncoder], fusion: nn.Module, head: PredictionHead, task: TaskSpec):
        super().__init__()
        self.names = list(encoders)
        self.encoders = nn.ModuleDict(encoders)
        self.fusion = fusion
        self.head = head
        self.task_type = task.type

    def encode(self, batch: Batch) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        tokens, pads = {}, {}
        for m in self.names:
            tokens[m], pads[m] = self.encoders[m](batch.x[m], batch.lengths[m])
        return tokens, pads

    def forward(self, batch: Batch) -> ModelOutput:
        return self.forward_tokens(*self.encode(batch))

    def forward_tokens(self, tokens: dict[str, torch.Tensor], pads: dict[str, torch.Tensor],
                       **fusion_kwargs) -> ModelOutput:
        """Everything after :meth:`encode`: fusion, head, output (a model transform may edit the tokens)."""
        fused = self.fusion(tokens, pads, **fusion_kwargs)
        pred = self.head(fused)
        if self.task_type == "regression":
            pred = pred.squeeze(-1)
        features = {m: masked_mean(tokens[m], pads[m]) for m in self.names}
        return ModelOutput(pred=pred, fused=fused, tokens=tokens, features=features)
