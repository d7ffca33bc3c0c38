"""Fusion backbones: how per-modality token sequences become one representation.

- ``late``: pool each modality, concatenate, MLP. Cheap, but blind to token-level interactions.
- ``mult``: MulT-style crossmodal transformer (Tsai et al., 2019): every modality attends to every
  other one's tokens (query = target modality, key/value = source modality), the crossmodal
  streams of a target are merged and passed through self-attention, then pooled and concatenated.
- ``concat``: CGGM's "MSA model" for MOSI/IEMOCAP (official ``models/msamodel.py``): the encoded
  sequences of all modalities are concatenated along time and passed through a self-attention
  transformer (``layers`` layers; CGGM uses its ``nlevels - 2``); the first time step's output is
  the fused representation, as in CGGM.
"""

from __future__ import annotations

import torch
from torch import nn

from mmrepro.models.encoders import masked_mean


class LateFusion(nn.Module):
    modality_blocks = True   # fused = one d-wide block per modality, in order (see the note above FUSIONS)

    def __init__(self, names: list[str], d_model: int, dropout: float, **_):
        super().__init__()
        self.names = names
        self.out_dim = d_model * len(names)
        self.mlp = nn.Sequential(nn.Linear(self.out_dim, self.out_dim), nn.ReLU(), nn.Dropout(dropout))

    def forward(self, tokens: dict[str, torch.Tensor], pads: dict[str, torch.Tensor]) -> torch.Tensor:
        pooled = torch.cat([masked_mean(tokens[m], pads[m]) for m in self.names], dim=-1)
        return pooled + self.mlp(pooled)


class CrossmodalBlock(nn.Module):
    """Pre-norm cross-attention of a target sequence over a source sequence, then a feed-forward."""

    def __init__(self, d_model: int, heads: int, dropout: float):
        super().__init__()
        self.norm_q, self.norm_kv, self.norm_ff = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.ReLU(), nn.Dropout(dropout),
                                nn.Linear(2 * d_model, d_model))

    def forward(self, target: torch.Tensor, source: torch.Tensor, source_pad: torch.Tensor) -> torch.Tensor:
        kv = self.norm_kv(source)
        h = target + self.attn(self.norm_q(target), kv, kv, key_padding_mask=source_pad, need_weights=False)[0]
        return h + self.ff(self.norm_ff(h))


class CrossmodalFusion(nn.Module):
    modality_blocks = True   # one pooled stream per target modality

    def __init__(self, names: list[str], d_model: int, dropout: float, heads: int, layers: int, **_):
        super().__init__()
        self.names = names
        self.cross = nn.ModuleDict({
            f"{s}->{t}": nn.ModuleList(CrossmodalBlock(d_model, heads, dropout) for _ in range(layers))
            for t in names for s in names if s != t
        })
        self.merge = nn.ModuleDict({t: nn.Linear(d_model * (len(names) - 1), d_model) for t in names})
        layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=2 * d_model, dropout=dropout,
                                           batch_first=True, norm_first=True)
        self.self_attn = nn.ModuleDict({t: nn.TransformerEncoder(layer, 1, enable_nested_tensor=False) for t in names})
        self.out_dim = d_model * len(names)

    def forward(self, tokens: dict[str, torch.Tensor], pads: dict[str, torch.Tensor]) -> torch.Tensor:
        pooled = []
        for t in self.names:
            streams = []
            for s in self.names:
                if s == t:
                    continue
                h = tokens[t]
                for block in self.cross[f"{s}->{t}"]:
                    h = block(h, tokens[s], pads[s])
                streams.append(h)
            h = self.self_attn[t](self.merge[t](torch.cat(streams, dim=-1)), src_key_padding_mask=pads[t])
            pooled.append(masked_mean(h, pads[t]))
        return torch.cat(pooled, dim=-1)


class ConcatFusion(nn.Module):
    modality_blocks = False  # one transformer output over all modalities' tokens

    def __init__(self, names: list[str], d_model: int, dropout: float, heads: int, layers: int, **_):
        super().__init__()
        self.names = names
        layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=2 * d_model, dropout=dropout,
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out_dim = d_model

    def forward(self, tokens: dict[str, torch.Tensor], pads: dict[str, torch.Tensor]) -> torch.Tensor:
        h = torch.cat([tokens[m] for m in self.names], dim=1)
        pad = torch.cat([pads[m] for m in self.names], dim=1)
        return self.transformer(h, src_key_padding_mask=pad)[:, 0]


#: A fusion's ``modality_blocks`` says whether its output ``fused`` is the concatenation of one
#: equal-width block per modality (in ``names`` order), so a linear head over it splits by modality
#: (OGM-GE's weight split needs that); False where the blocks mix every modality (a joint transformer).
FUSIONS = {"late": LateFusion, "mult": CrossmodalFusion, "concat": ConcatFusion}
