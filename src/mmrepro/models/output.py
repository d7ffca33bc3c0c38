"""What every model returns (:class:`ModelOutput`): its own module, so that the model builders and the
methods import it without importing one another."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ModelOutput:
    pred: torch.Tensor  # (B,) regression, (B, K) class logits or (B, K, D, H, W) voxel logits
    fused: torch.Tensor  # (B, F) input of the head (segmentation: the pooled fused bottleneck)
    tokens: dict[str, torch.Tensor]  # per modality (B, T_m, d)
    features: dict[str, torch.Tensor]  # per modality pooled (B, d)
    # (B, R) what test-time adapters compare across views (CASP's contrastive loss); a backbone
    # names its own (CASP's late fusion: the concatenated per-modality readouts), else ``fused``
    representation: torch.Tensor | None = None
    # a model's own training objective (scalar), added to the task loss by the training loop
    # (e.g. MCTN's and MMIN's reconstruction losses); None: none
    aux_loss: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.representation is None:
            self.representation = self.fused
