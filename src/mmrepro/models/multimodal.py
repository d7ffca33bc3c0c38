"""The shared multimodal model: per-modality encoders, a fusion backbone and a prediction head.

Its output exposes the intermediate representations every method family needs: per-modality
token sequences and pooled features (for unimodal classifiers and gradient modulation), the
fused representation (for adapters placed before the head) and the prediction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmrepro.data.loader import Batch
from mmrepro.data.schema import DatasetSchema, TaskSpec
from mmrepro.models.encoders import ModalityEncoder, masked_mean
from mmrepro.models.fusion import FUSIONS


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


def build_model(schema: DatasetSchema, task: TaskSpec, *, backbone: str, d_model: int, layers: int,
                heads: int, kernel: int, dropout: float, fusion_layers: int,
                modalities: list[str] | None = None, dropouts: dict[str, float] | None = None,
                causal: bool | None = None, position_padding: bool = False, resnet: int = 101,
                resnet_width: int = 64) -> nn.Module:
    """One builder for every backbone, as torchvision's model builders: plain arguments in, module out.

    A ``segmentation`` task gets CGGM's 2-D DeepLabv3+ for ``backbone="deeplab2d"``
    (:mod:`mmrepro.models.deeplab`: ``d_model`` = ASPP/decoder width, ``resnet`` depth and
    ``resnet_width``), else the 3-D U-Net of :mod:`mmrepro.models.segmentation` (``d_model`` =
    bottleneck width, ``layers`` = blocks per level, ``dropout``): a study's model config is shared
    by all its datasets, so ``backbone`` may still name a sequence fusion (``late``/``mult``, then
    ignored) or be ``unet3d``; ``heads``, ``kernel`` and ``fusion_layers`` do not apply. A
    segmentation backbone for a sequence task is an error.

    The papers' backbones (``casp_late``, ``casp_early``, ``cggm_msa``, ``cggm_food``,
    ``mplmm_mult``) are built by :func:`mmrepro.models.presets.build_preset` from ``d_model``,
    ``layers``, ``heads``, ``fusion_layers`` and the preset-only ``dropouts`` (per site; missing
    sites take the preset's official value), ``causal`` (None = preset default) and
    ``position_padding``; ``kernel`` and ``dropout`` do not apply to them.
    """
    from mmrepro.models.presets import PRESETS, build_preset  # they import from here
    from mmrepro.models.deeplab import deeplab2d
    from mmrepro.models.segmentation import SEGMENTATION_BACKBONES, unet3d

    if task.type == "segmentation":
        if backbone not in SEGMENTATION_BACKBONES and backbone not in FUSIONS and backbone not in PRESETS:
            raise ValueError(f"unknown backbone {backbone!r}; known: {sorted([*FUSIONS, *PRESETS, *SEGMENTATION_BACKBONES])}")
        if backbone == "deeplab2d":
            return deeplab2d(schema, task, d_model=d_model, resnet=resnet, resnet_width=resnet_width,
                             modalities=modalities)
        return unet3d(schema, task, d_model=d_model, layers=layers, dropout=dropout, modalities=modalities)
    if backbone in SEGMENTATION_BACKBONES:
        raise ValueError(f"backbone {backbone!r} is for segmentation tasks; task {task.name!r} is {task.type}")
    names = modalities or schema.modality_names
    if backbone in PRESETS:
        return build_preset(backbone, schema, task, names, d_model=d_model, layers=layers, heads=heads,
                            fusion_layers=fusion_layers, dropouts=dropouts, causal=causal,
                            position_padding=position_padding)
    if backbone not in FUSIONS:
        raise ValueError(f"unknown backbone {backbone!r}; known: {sorted([*FUSIONS, *PRESETS])}")
    encoders = {m: ModalityEncoder(schema.modality(m).dim, schema.modality(m).length, d_model, layers, heads,
                                   kernel, dropout) for m in names}
    fusion = FUSIONS[backbone](names, d_model=d_model, dropout=dropout, heads=heads, layers=fusion_layers)
    out_dim = 1 if task.type == "regression" else task.num_classes
    return MultimodalModel(encoders, fusion, PredictionHead(fusion.out_dim, out_dim, dropout), task)
