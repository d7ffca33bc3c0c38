"""Per-modality token encoders: a 1-D convolution into the model width, then self-attention."""

from __future__ import annotations

import torch
from torch import nn


def padding_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """``(B, T)`` boolean mask, True at padded positions (PyTorch's key-padding convention)."""
    return torch.arange(max_len, device=lengths.device)[None, :] >= lengths[:, None]


def attention_mask(pad: torch.Tensor) -> torch.Tensor:
    """The padding mask with the first position of empty sequences opened, so attention stays finite.

    That position holds a zero input and a zero output token, so it carries no information.
    """
    safe = pad.clone()
    safe[:, 0] = False
    return safe | (pad & ~pad.all(dim=1, keepdim=True))


def masked_mean(tokens: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """Mean over the non-padded tokens of ``(B, T, d)``."""
    keep = (~pad).unsqueeze(-1).to(tokens.dtype)
    return (tokens * keep).sum(1) / keep.sum(1).clamp_min(1.0)


class ModalityEncoder(nn.Module):
    """Conv1d projection (as MulT's temporal convolutions), learned positions, transformer layers."""

    def __init__(self, in_dim: int, max_len: int, d_model: int, layers: int, heads: int,
                 kernel: int, dropout: float):
        super().__init__()
        self.proj = nn.Conv1d(in_dim, d_model, kernel_size=kernel, padding=kernel // 2, bias=False)
        self.pos = nn.Parameter(torch.zeros(1, max_len, d_model))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=2 * d_model, dropout=dropout,
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)

    @property
    def width(self) -> int:
        return self.norm.normalized_shape[0]

    @property
    def max_len(self) -> int:
        return self.pos.shape[1]

    @property
    def layers(self) -> nn.ModuleList:
        return self.transformer.layers

    def embed(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The input stage: ``(B, T, D)`` features -> ``(B, T, d)`` tokens before the transformer, the
        ``(B, T)`` padding mask and the attention mask (a :class:`~mmrepro.models.stages.StagedEncoder`).

        Padded inputs are zeroed before the convolution, so padding values never leak into real tokens.
        """
        pad = padding_mask(lengths, x.shape[1])
        x = x.masked_fill(pad.unsqueeze(-1), 0.0)
        h = self.proj(x.transpose(1, 2)).transpose(1, 2) + self.pos[:, : x.shape[1]]
        return h, pad, attention_mask(pad)

    def run_layer(self, i: int, h: torch.Tensor, key_pad: torch.Tensor | None) -> torch.Tensor:
        return self.transformer.layers[i](h, src_key_padding_mask=key_pad)

    def finish(self, h: torch.Tensor, pad: torch.Tensor, key_pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.norm(h).masked_fill(pad.unsqueeze(-1), 0.0), key_pad

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, T, D)`` features -> ``(B, T, d)`` tokens (padded ones zero) and the attention mask."""
        h, pad, mask = self.embed(x, lengths)
        return self.finish(self.transformer(h, src_key_padding_mask=mask), pad, mask)
