"""What parameter-efficient methods may reach inside a backbone: one typed view of every backbone.

PEFT methods add prompts where tokens enter an encoder, run encoders layer by layer, or wrap and
branch the layers' sublayers. The project's light encoders (:class:`~mmrepro.models.encoders.ModalityEncoder`
on ``nn.TransformerEncoderLayer``) and the papers' presets (:class:`~mmrepro.models.presets.SequenceEncoder`
on MulT's :class:`~mmrepro.models.transformer.EncoderLayer`) build these differently; this module is
the one place that knows both, so no method special-cases a backbone.

- :class:`StagedEncoder`: a per-modality encoder run in stages, ``embed`` (the tokens entering the
  first layer, positions included) -> ``run_layer`` for each of its ``layers`` -> ``finish`` (final
  norm, padded steps zeroed: what ``forward`` returns). ``key_pad`` ``(B, T')`` is True at keys to
  ignore, or None (attend to all); a method that adds tokens widens it with :func:`open_keys`.
  Encoders whose transformer lives in the fusion (``casp_early``, ``mplmm_mult``) have no layers.
- :class:`BlockParts` (:func:`block_parts`): one transformer layer's attention, feed-forward linears,
  sublayer outputs and input norm; :func:`transformer_blocks` lists every layer of a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from mmrepro.models.fusion import CrossmodalBlock
from mmrepro.models.transformer import EncoderLayer


@runtime_checkable
class StagedEncoder(Protocol):
    """A per-modality token encoder that can be run stage by stage (module docstring)."""

    @property
    def width(self) -> int: ...

    @property
    def max_len(self) -> int: ...

    @property
    def layers(self) -> nn.ModuleList: ...

    def embed(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(h, pad, key_pad)``: tokens entering layer 0, the ``(B, T)`` padding mask, the layers' key mask."""

    def run_layer(self, i: int, h: torch.Tensor, key_pad: torch.Tensor | None) -> torch.Tensor: ...

    def finish(self, h: torch.Tensor, pad: torch.Tensor, key_pad: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's output tokens and the mask the fusion takes (as ``forward`` returns them)."""


def open_keys(key_pad: torch.Tensor | None, n: int, front: bool) -> torch.Tensor | None:
    """``key_pad`` widened by ``n`` attended positions in front of (or after) the tokens; None stays None."""
    if key_pad is None:
        return None
    extra = key_pad.new_zeros(key_pad.shape[0], n)  # zero means "attend" for boolean and additive masks alike
    return torch.cat([extra, key_pad] if front else [key_pad, extra], dim=1)


def staged_encoders(model: nn.Module, method: str, layered: bool = True) -> dict[str, StagedEncoder]:
    """The model's per-modality encoders (``layered``: each with at least one layer); else a clear error
    naming ``method``."""
    encoders = getattr(model, "encoders", None)
    if encoders is None or not all(isinstance(e, StagedEncoder) for e in encoders.values()):
        raise TypeError(f"{method}: needs a model with per-modality transformer encoders, got "
                        f"{type(model).__name__} (e.g. the segmentation U-Net has none)")
    if layered and any(len(e.layers) == 0 for e in encoders.values()):
        raise ValueError(f"{method}: needs per-modality transformer encoders; this backbone's encoders only "
                         "project their inputs and its transformer reads all modalities at once (casp_early, "
                         "mplmm_mult): use a backbone with one encoder per modality (casp_late, cggm_msa, late, ...)")
    return dict(encoders)


@dataclass(frozen=True)
class BlockParts:
    """One transformer layer as LoRA and bottleneck adapters see it.

    ``attention`` holds the packed ``(3d, d)`` ``in_proj_weight`` and ``out_proj``; ``feed_forward``
    the ``(parent, attribute)`` of its linears, first then last; ``attention_output`` / ``ff_output``
    the ``(parent, attribute)`` of the module whose output is that sublayer's just before its
    residual addition; ``input_norm`` the LayerNorm the layer applies to its input first.
    """

    width: int
    attention: nn.Module
    feed_forward: tuple[tuple[nn.Module, str], ...]
    attention_output: tuple[nn.Module, str]
    ff_output: tuple[nn.Module, str]
    input_norm: nn.Module


BLOCK_TYPES = (nn.TransformerEncoderLayer, CrossmodalBlock, EncoderLayer)


def block_parts(layer: nn.Module) -> BlockParts:
    """The parts of ``layer``, one of :data:`BLOCK_TYPES` (or a subclass a method swapped in).

    ``nn.TransformerEncoderLayer`` ends its sublayers with ``dropout1`` / ``dropout2``;
    ``CrossmodalBlock`` adds ``attn``'s and ``ff``'s outputs; MulT's ``EncoderLayer`` adds
    ``self_attn``'s and ``fc2``'s outputs after a functional dropout (so an adapter there sits
    before that dropout).
    """
    if isinstance(layer, nn.TransformerEncoderLayer):
        return BlockParts(layer.norm1.normalized_shape[0], layer.self_attn, ((layer, "linear1"), (layer, "linear2")),
                          (layer, "dropout1"), (layer, "dropout2"), layer.norm1)
    if isinstance(layer, CrossmodalBlock):
        ff = tuple((layer.ff, name) for name, m in layer.ff.named_children() if hasattr(m, "in_features"))
        return BlockParts(layer.norm_q.normalized_shape[0], layer.attn, ff, (layer, "attn"), (layer, "ff"),
                          layer.norm_q)
    if isinstance(layer, EncoderLayer):
        norm = layer.layer_norms[0]
        return BlockParts(norm.normalized_shape[0], layer.self_attn, ((layer, "fc1"), (layer, "fc2")),
                          (layer, "self_attn"), (layer, "fc2"), norm)
    raise TypeError(f"not a transformer layer: {type(layer).__name__}")


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Every transformer layer of the model's encoders and fusion, in module order."""
    return [m for part in (model.encoders, model.fusion) for m in part.modules() if isinstance(m, BLOCK_TYPES)]
