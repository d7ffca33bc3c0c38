"""MPMM / "missing-aware prompts" (Lee et al., CVPR 2023) as MPLMM compares with it, on the same frozen MulT.

Why: it is the prompt baseline of MPLMM's Table 1: one learned prompt per missing pattern
(``2^M - 1`` of them, growing exponentially with M, where MPLMM's grow linearly), on a frozen
transformer. Here, on the ``mplmm_mult`` stage API: each sample's missing inputs are zeros
(substitution; never read), and the prompt of its pattern (``prompt_length`` tokens of the memory
width ``W = (M-1) d``, one set per memory branch) is appended to every memory transformer's input,
whose last position is read out. The original prepends prompts to several layers of a
vision-language transformer; this keeps one insertion point (the memory input, where MPLMM's
type prompts go) so the two differ only in how prompts are indexed. Training as MPLMM: frozen
backbone, re-initialised input projections and output layer.

Trainable: ``sum_X D_X d + (M W + 1) K + (2^M - 1) M l W``.
"""

from __future__ import annotations

import torch
from torch import nn

from mmrepro.data.loader import Batch
from mmrepro.methods.incomplete import substitute
from mmrepro.methods.mplmm import MPLMM, NORMAL_STD, freeze_for_transfer
from mmrepro.methods.params import PositiveInt
from mmrepro.methods.registry import TRANSFORMS
from mmrepro.methods.transforms import ModelTransform
from mmrepro.models.multimodal import ModelOutput


def map_param_count(dims: list[int], d: int, l: int, out_dim: int) -> int:
    """The module docstring's formula."""
    m, w = len(dims), (len(dims) - 1) * d
    return sum(dims) * d + (m * w + 1) * out_dim + (2 ** m - 1) * m * l * w


class PatternPrompted(nn.Module):
    """A frozen MulT whose memory inputs end with the prompt of each sample's missing pattern."""

    def __init__(self, backbone: nn.Module, prompt_length: int):
        super().__init__()
        m, w = len(backbone.names), backbone.fusion.memory_dim
        self.backbone, self.names, self.task_type = backbone, backbone.names, backbone.task_type
        # (pattern code, branch, l, W); code = sum_i present_i 2^i, code 0 (nothing present) unused
        self.prompts = nn.Parameter(nn.init.trunc_normal_(torch.empty(2 ** m - 1, m, prompt_length, w), std=NORMAL_STD))

    def forward(self, batch: Batch) -> ModelOutput:
        batch = substitute(batch, batch.present)
        codes = (batch.present.long() << torch.arange(len(self.names), device=batch.present.device)).sum(1)
        chosen = self.prompts[codes - 1]  # (B, M, l, W)
        return self.backbone.forward_from_projected(*self.backbone.project(batch),
                                                    memory_suffix={m: chosen[:, i] for i, m in enumerate(self.names)})


@TRANSFORMS.register("map")
class MissingAwarePrompts(ModelTransform):
    """MPMM: one prompt per missing pattern on a frozen ``mplmm_mult`` (see the module docstring)."""

    def __init__(self, prompt_length: PositiveInt = 16):
        self.prompt_length = prompt_length

    def param_count(self, model: nn.Module) -> int:
        dims, _, d = MPLMM._sizes(model)
        return map_param_count(dims, d, self.prompt_length, model.head.out.out_features)

    def apply(self, model: nn.Module) -> nn.Module:
        MPLMM._sizes(model)  # the mplmm_mult check
        freeze_for_transfer(model)
        return PatternPrompted(model, self.prompt_length)
