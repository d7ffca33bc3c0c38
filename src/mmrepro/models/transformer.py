"""The transformer encoder of the papers' backbones (MulT's fairseq-derived block), on fused kernels.

CASP, CGGM, MPLMM and Wander all build their models from MulT's ``TransformerEncoder``; this
module states it once, so that every paper preset in :mod:`mmrepro.models.presets` is that block
with different wiring. What the official block does, and what this one does the same way:

- input ``x`` (unscaled) -> ``sqrt(d) * x + positions`` -> embedding dropout -> ``L`` layers ->
  a final LayerNorm;
- positions are fairseq's sinusoids: the first ``d // 2`` channels ``sin(p * w_i)``, the next
  ``cos(p * w_i)``, ``w_i = 10000 ** (-i / (d // 2 - 1))``, a zero column if ``d`` is odd; step ``t``
  gets position ``p = t + 1``. The official code gives position 0 (a zero vector) to every step
  whose first input channel is exactly 0, its test for padding: ``position_padding=True``
  reproduces that; the default numbers all steps (identical whenever no channel-0 value is 0);
- each layer is pre-LayerNorm: ``x + drop_res(attn(LN0(x)))`` then
  ``x + drop_res(fc2(drop_relu(relu(fc1(LN1(x))))))`` with ``fc1: d -> 4d``; attention weights
  get their own dropout (``attn``);
- crossmodal variant (MulT): queries from the target sequence, keys and values from a source
  sequence embedded the same way (scale, positions, and two independent embedding-dropout draws,
  one for keys and one for values, as the code does); LN0 normalises query, keys and values;
- ``causal``: MulT's "future" mask. A query at step ``i`` sees key steps ``j <= i + |T_k - T_q|``
  (for self-attention the usual causal mask).

Parameters per layer ``12 d^2 + 13 d`` (attention ``4 d^2 + 4 d``, feed-forward ``8 d^2 + 5 d``,
two LayerNorms ``4 d``); an encoder of ``L`` layers: ``L (12 d^2 + 13 d) + 2 d``
(:func:`encoder_params`). Tensor names follow the official ones (``layers.i.self_attn.in_proj_weight``,
``layer_norms.0``, ``fc1``, ``layer_norm``), so an official checkpoint's encoder maps key for key.

Where it differs on purpose, for speed, not result: tensors are batch-first ``(B, T, d)``;
attention goes through ``torch.nn.functional.scaled_dot_product_attention`` (flash /
memory-efficient kernels, dropout fused on GPU), except while training with attention dropout
on the CPU (:mod:`mmrepro.models.dropout`: the same function in distribution at about a third of
the cost, as are its other dropouts there); no mask tensor is built unless some key is padded or a
causal mask cannot use the kernel's own (``T_q != T_k``).

Where it differs in result: padded keys are masked out. The official code has no lengths: its
sequences are zero-padded and every step, padding included, is attended to. So on inputs with
stored lengths shorter than the padded length, predictions differ from the code's (by 0.03-0.05
on CASP's zero-padded MMSA features, measured beside the released code); on inputs without
lengths (the MulT pickles: every length is the padded one) nothing is masked and the padded
steps are attended to as in the code. With ``position_padding`` such all-zero steps also get the
code's zero position vector, where they reach an encoder as zeros (a projection without bias,
``mplmm_mult``'s).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from mmrepro.models.dropout import attention, attention_mask_once, dropout


@dataclass(frozen=True)
class Dropouts:
    """MulT's five dropout sites: attention weights, after the ReLU, on each residual branch, on the
    embedded input, and inside the prediction head (``out``)."""

    attn: float = 0.0
    relu: float = 0.0
    res: float = 0.0
    embed: float = 0.0
    out: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"dropout {f.name!r} must be in [0, 1), got {value}")


def encoder_params(d: int, layers: int) -> int:
    """Parameters of one :class:`TransformerEncoder` of width ``d`` and ``layers`` layers."""
    return layers * (12 * d * d + 13 * d) + 2 * d


def sinusoidal_table(n: int, d: int) -> torch.Tensor:
    """``(n, d)`` fairseq sinusoids for positions ``0 .. n-1``; row 0 (the padding position) is zero."""
    half = d // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float) * -(math.log(10000.0) / max(half - 1, 1)))
    angles = torch.arange(n, dtype=torch.float)[:, None] * freq[None, :]
    table = torch.cat([angles.sin(), angles.cos()], dim=1)
    if d % 2:
        table = F.pad(table, (0, 1))
    table[0] = 0.0
    return table


class SinusoidalPositions(nn.Module):
    """Position vectors for a ``(B, T, d)`` input; a cached table, never a parameter."""

    def __init__(self, d: int, padding_rule: bool = False):
        super().__init__()
        self.d, self.padding_rule = d, padding_rule
        self._table = torch.zeros(0, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = x.shape[1]
        if self._table.shape[0] <= steps or self._table.device != x.device:
            self._table = sinusoidal_table(max(steps + 1, 2 * self._table.shape[0]), self.d).to(x.device)
        table = self._table.to(x.dtype)
        if not self.padding_rule:
            return table[1: steps + 1].unsqueeze(0)
        index = torch.arange(1, steps + 1, device=x.device) * (x[..., 0] != 0)
        return table[index]


class MultiheadAttention(nn.Module):
    """fairseq's parameter layout (one ``(3d, d)`` input projection, an output ``Linear``), computed
    by PyTorch's fused scaled-dot-product attention."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        if d % heads:
            raise ValueError(f"model width {d} is not divisible by {heads} heads")
        self.num_heads, self.dropout = heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d, d))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d))
        self.out_proj = nn.Linear(d, d)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        return x.view(b, t, self.num_heads, d // self.num_heads).transpose(1, 2)

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        """Self-attention when ``key`` is None; ``mask`` is boolean, True where attention is allowed."""
        w, bias = self.in_proj_weight, self.in_proj_bias
        d = query.shape[-1]
        if key is None:
            q, k, v = F.linear(query, w, bias).chunk(3, dim=-1)
        elif value is None or value is key:
            q = F.linear(query, w[:d], bias[:d])
            k, v = F.linear(key, w[d:], bias[d:]).chunk(2, dim=-1)
        else:
            q = F.linear(query, w[:d], bias[:d])
            k = F.linear(key, w[d: 2 * d], bias[d: 2 * d])
            v = F.linear(value, w[2 * d:], bias[2 * d:])
        out = attention(self._split(q), self._split(k), self._split(v), self.dropout if self.training else 0.0,
                        mask, causal)
        return self.out_proj(out.transpose(1, 2).reshape(query.shape))


def _linear(d_in: int, d_out: int) -> nn.Linear:
    layer = nn.Linear(d_in, d_out)
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class EncoderLayer(nn.Module):
    """One pre-LayerNorm layer: (cross-)attention then a ``4d`` ReLU feed-forward, each residual."""

    def __init__(self, d: int, heads: int, dropouts: Dropouts):
        super().__init__()
        self.self_attn = MultiheadAttention(d, heads, dropouts.attn)
        self.layer_norms = nn.ModuleList([nn.LayerNorm(d), nn.LayerNorm(d)])
        self.fc1, self.fc2 = _linear(d, 4 * d), _linear(4 * d, d)
        self.relu_dropout, self.res_dropout = dropouts.relu, dropouts.res

    def attend(self, x: torch.Tensor, source: tuple[torch.Tensor, torch.Tensor] | None = None,
               mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        """The attention sublayer with its residual (what a method branching beside the feed-forward reads)."""
        norm = self.layer_norms[0]
        if source is None:
            h = self.self_attn(norm(x), mask=mask, causal=causal)
        else:
            k = norm(source[0])
            v = k if source[1] is source[0] else norm(source[1])
            h = self.self_attn(norm(x), k, v, mask=mask, causal=causal)
        return x + dropout(h, self.res_dropout, self.training)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The feed-forward sublayer with its residual."""
        h = dropout(F.relu(self.fc1(self.layer_norms[1](x))), self.relu_dropout, self.training)
        return x + dropout(self.fc2(h), self.res_dropout, self.training)

    def forward(self, x: torch.Tensor, source: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        return self.feed_forward(self.attend(x, source, mask, causal))


class TransformerEncoder(nn.Module):
    """MulT's encoder: scaled input plus sinusoidal positions, ``layers`` layers, a final LayerNorm.

    ``forward(x)`` is self-attention over ``x``; ``forward(x, source)`` is MulT's crossmodal
    transformer (queries from ``x``, keys and values from ``source``). ``key_pad`` ``(B, T_k)`` is
    True at keys to ignore (None: attend to all, and no mask tensor is built).
    """

    def __init__(self, d: int, heads: int, layers: int, dropouts: Dropouts, causal: bool = False,
                 position_padding: bool = False):
        super().__init__()
        self.embed_scale = math.sqrt(d)
        self.embed_positions = SinusoidalPositions(d, position_padding)
        self.embed_dropout, self.attn_dropout = dropouts.embed, dropouts.attn
        self.causal = causal
        self.layers = nn.ModuleList(EncoderLayer(d, heads, dropouts) for _ in range(layers))
        self.layer_norm = nn.LayerNorm(d)

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed_scale * x + self.embed_positions(x)

    def _layers_mask(self, tq: int, tk: int, key_pad: torch.Tensor | None, like: torch.Tensor
                     ) -> tuple[torch.Tensor | None, bool]:
        """:meth:`_mask`, built once for all layers, additive where the CPU dropout path will add it
        (:func:`~mmrepro.models.dropout.attention_mask_once`)."""
        rate = self.attn_dropout if self.training else 0.0
        return attention_mask_once(*self._mask(tq, tk, key_pad, like.device), tq, tk, like, rate)

    def _mask(self, tq: int, tk: int, key_pad: torch.Tensor | None, device: torch.device
              ) -> tuple[torch.Tensor | None, bool]:
        """(boolean mask or None, whether to use the kernel's own causal mask)."""
        if key_pad is None and (not self.causal or tq == tk):
            return None, self.causal
        allowed = None
        if self.causal:
            offset = torch.arange(tk, device=device)[None, :] - torch.arange(tq, device=device)[:, None]
            allowed = offset <= abs(tk - tq)
        if key_pad is not None:
            keep = ~key_pad[:, None, None, :]
            allowed = keep if allowed is None else keep & allowed
        return allowed, False

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the first layer takes it: scaled, positions added, embedding dropout."""
        return dropout(self._scaled(x), self.embed_dropout, self.training)

    def encode(self, h: torch.Tensor, key_pad: torch.Tensor | None = None) -> torch.Tensor:
        """Self-attention layers and the final LayerNorm over already embedded tokens."""
        mask, causal = self._layers_mask(h.shape[1], h.shape[1], key_pad, h)
        for layer in self.layers:
            h = layer(h, None, mask, causal)
        return self.layer_norm(h)

    def forward(self, x: torch.Tensor, source: torch.Tensor | None = None,
                key_pad: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(x)
        if source is None:
            return self.encode(h, key_pad)
        s = self._scaled(source)
        if self.training and self.embed_dropout > 0:
            kv = (dropout(s, self.embed_dropout, True), dropout(s, self.embed_dropout, True))
        else:
            kv = (s, s)
        mask, causal = self._layers_mask(x.shape[1], source.shape[1], key_pad, h)
        for layer in self.layers:
            h = layer(h, kv, mask, causal)
        return self.layer_norm(h)
