"""Dropout on the CPU at a fraction of PyTorch's cost: on activations, and on attention weights.

A training step of the papers' presets on the CPU spends most of its time on dropout, not on
arithmetic. Profiled at MOSI's lengths (``casp_late``, 50/375/500 steps, batch 8, one thread):

- masks are drawn by ``bernoulli_`` at ~11 ns an element (a float draw each, serially), and
  ``F.dropout`` then divides and multiplies in two more passes;
- PyTorch's fused attention kernels have no dropout on the CPU, so ``scaled_dot_product_attention``
  falls back to its math path, where each ``B x H x T_q x T_k`` tensor (64 MB at 500 steps) is a
  fresh ``mmap`` above glibc's 32 MB threshold: every operator pays page faults on all of it (a
  ``bmm`` into a fresh buffer costs ~7x the same ``bmm`` into a reused one);
- products with ``head_dim``-wide operands (5 in ``casp_late``) run ~5x faster on MKL with the
  narrow side as the rows: ``(v^T p^T)^T`` rather than ``p v``.

So, here: a mask from 15 random bits per element (two elements per 32-bit draw of the default
generator, :func:`keep_mask`), turned in one pass into the multiplier of :func:`dropout`, and
attention computed in chunks of ``(batch x head)`` slices that fit the L2 cache
(:data:`CHUNK_BYTES`), the mask AND-ed onto the weights' bits, with transposed products, the
additive mask added in place and no "safe softmax" pass (:func:`dropout_attention`). The attention keeps for its
backward each chunk's softmax and its int16 keep-mask (6 bytes an element; the math path ~12).

Same distribution: each element is kept independently with probability ``1 - r`` and kept ones
are scaled by ``1 / (1 - r)``, where ``r`` is the configured rate rounded to a multiple of
``2**-15`` (at most ``1.5e-5`` away; PyTorch's float ``bernoulli_`` rounds to ``2**-24``); the
scale uses that same ``r``, so the result stays unbiased. The random numbers come from the
default CPU generator: ``torch.manual_seed`` makes runs repeat exactly, but the draws differ
from ``bernoulli_``'s, so a seeded run is not the same run as before these paths existed.

An attention mask must leave every query at least one key (the presets' masks always open key 0):
a fully masked row would give NaN, where the math path's "safe softmax" gives zeros; it is checked
once per call on the small boolean mask, not on the scores. Other devices and dtypes (CUDA, where
the fused kernels do have dropout; bfloat16 under autocast), and code traced by ``torch.compile``
(whose generated kernels draw and fuse dropout themselves), take PyTorch's own functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Bytes of scores per chunk: the L2 cache of one core (1 MiB here); 0.5-1 MiB measured best.
CHUNK_BYTES = 1 << 20
#: Resolution of the drop probability: 15 random bits per element.
RATE_STEPS = 1 << 15
_INT = {4: torch.int32, 8: torch.int64}


def quantised_rate(rate: float) -> float:
    """The drop probability actually used for ``rate``: the nearest multiple of ``2**-15``."""
    return round(rate * RATE_STEPS) / RATE_STEPS


def keep_mask(n: int, rate: float) -> torch.Tensor:
    """``(n,)`` int16: -1 (all bits set) where an element is kept, 0 where dropped, i.i.d. with
    drop probability :func:`quantised_rate`. Two elements per 31-bit draw, 15 bits each."""
    draws = torch.empty((n + 1) // 2, dtype=torch.int32).random_()  # uniform on [0, 2**31)
    bits = draws.bitwise_and_(0x7FFF7FFF).view(torch.int16)[:n]  # two uniform 15-bit numbers each
    threshold = round(rate * RATE_STEPS)
    # kept iff bits >= threshold  <=>  threshold - 1 - bits < 0: its sign bit, spread by the shift
    return bits.neg_().add_(threshold - 1).bitwise_right_shift_(15)


def _masked(x: torch.Tensor, keep: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """``x`` with the elements where ``keep`` (int16 -1/0, or already widened to ``x``'s width) is 0 set
    to +0.0, in place or in a new tensor."""
    as_int = _INT[x.element_size()]
    bits = keep.to(as_int)  # sign extension: -1 stays all ones
    if in_place:
        return x.view(as_int).bitwise_and_(bits).view(x.dtype)
    return torch.bitwise_and(x.view(as_int), bits).view(x.dtype)


def _fast_path(x: torch.Tensor) -> bool:
    """CPU float tensors, eagerly: under ``torch.compile`` the compiler fuses PyTorch's own dropout."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and not torch.compiler.is_compiling()


class _Dropout(torch.autograd.Function):
    """``x * m`` with ``m`` = 0 or ``1 / (1 - r)`` (built in one pass from the int16 mask), kept for the backward."""

    @staticmethod
    def forward(ctx, x, rate: float):
        scale = torch.empty(x.shape, dtype=x.dtype)
        torch.mul(keep_mask(x.numel(), rate).view(x.shape), -1.0 / (1.0 - quantised_rate(rate)), out=scale)
        ctx.save_for_backward(scale)
        return x * scale

    @staticmethod
    def backward(ctx, grad):
        scale, = ctx.saved_tensors
        return grad * scale, None


def dropout(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """``F.dropout(x, rate, training)`` in distribution, with the cheap mask on CPU float tensors."""
    if not training or rate == 0.0 or not _fast_path(x):
        return F.dropout(x, rate, training)
    return _Dropout.apply(x, rate)


# --- attention ---------------------------------------------------------------------------------


def _chunk_slices(heads: int, tq: int, tk: int, itemsize: int) -> int:
    """Slices per chunk: as many as fit :data:`CHUNK_BYTES`, whole batch rows or a divisor of ``heads``
    (a chunk never straddles two samples, so a per-sample mask indexes it by one slice)."""
    per = max(1, CHUNK_BYTES // (tq * tk * itemsize))
    if per >= heads:
        return per - per % heads
    return max(d for d in range(1, per + 1) if heads % d == 0)


def _add_bias(scores: torch.Tensor, bias: torch.Tensor | None, start: int, heads: int) -> None:
    """Add the ``(B or 1, 1, T_q or 1, T_k)`` additive mask to a chunk of slices ``start..``, in place."""
    if bias is None:
        return
    n, tq, tk = scores.shape
    if bias.shape[0] == 1:
        scores.add_(bias[0])
    elif n >= heads:
        b = start // heads
        scores.view(n // heads, heads, tq, tk).add_(bias[b: b + n // heads])
    else:
        scores.add_(bias[start // heads])


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, heads: int,
            rate: float, keep_for_backward: bool) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Chunked forward on ``(G, T, d)`` slices; returns ``(G, d, T_q)`` (transposed) output, and each
    chunk's softmax and keep-mask when ``keep_for_backward``."""
    g, tq, _ = q.shape
    tk = k.shape[1]
    per = _chunk_slices(heads, tq, tk, q.element_size())
    out_t = q.new_empty(g, v.shape[2], tq)
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)
    probs, keeps = [], []
    for i in range(0, g, per):
        j = min(g, i + per)
        scores = torch.bmm(q[i:j], kt[i:j])
        _add_bias(scores, bias, i, heads)
        p = torch.softmax(scores, -1)
        del scores
        keep = keep_mask(p.numel(), rate).view(p.shape)
        if keep_for_backward:
            probs.append(p)
            keeps.append(keep)
        torch.bmm(vt[i:j], _masked(p, keep, in_place=not keep_for_backward).transpose(1, 2), out=out_t[i:j])
    return out_t.mul_(1.0 / (1.0 - quantised_rate(rate))), probs, keeps


class _DropoutAttention(torch.autograd.Function):
    """The chunked forward, keeping each chunk's softmax and keep-mask, and its hand-written backward."""

    @staticmethod
    def forward(ctx, q, k, v, bias, heads: int, rate: float):
        out_t, probs, keeps = _attend(q, k, v, bias, heads, rate, keep_for_backward=True)
        ctx.save_for_backward(q, k, v, *probs, *keeps)
        ctx.heads, ctx.rate, ctx.chunks = heads, rate, len(probs)
        return out_t.transpose(1, 2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, *rest = ctx.saved_tensors
        probs, keeps = rest[:ctx.chunks], rest[ctx.chunks:]
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        g, tq, _ = q.shape
        tk = k.shape[1]
        per = _chunk_slices(ctx.heads, tq, tk, q.element_size())
        go = grad_out * (1.0 / (1.0 - quantised_rate(ctx.rate)))
        got, vt, qt, kt = go.transpose(1, 2), v.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2)
        gq_t = q.new_empty(g, q.shape[2], tq) if need_q else None
        gk_t = k.new_empty(g, k.shape[2], tk) if need_k else None
        gv_t = v.new_empty(g, v.shape[2], tk) if need_v else None
        for c, i in enumerate(range(0, g, per)):
            j = min(g, i + per)
            p, keep = probs[c], keeps[c].to(_INT[q.element_size()])
            if need_v:
                torch.bmm(got[i:j], _masked(p, keep), out=gv_t[i:j])
            if need_q or need_k:
                grad_p = torch.bmm(go[i:j], vt[i:j])
                grad_s = torch._softmax_backward_data(_masked(grad_p, keep, in_place=True), p, -1, p.dtype)
                if need_q:
                    torch.bmm(kt[i:j], grad_s.transpose(1, 2), out=gq_t[i:j])
                if need_k:
                    torch.bmm(qt[i:j], grad_s, out=gk_t[i:j])
        t = lambda x: None if x is None else x.transpose(1, 2)  # noqa: E731
        return t(gq_t), t(gk_t), t(gv_t), None, None, None


def additive_mask(mask: torch.Tensor | None, causal: bool, tq: int, tk: int, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor | None:
    """``(B or 1, 1, T_q or 1, T_k)`` 0 / -inf from a boolean mask (True = attend) and a causal flag
    (``T_q == T_k``, as ``scaled_dot_product_attention``'s ``is_causal``); None when neither. A float
    mask is taken as already additive."""
    if mask is None and not causal:
        return None
    if mask is not None and mask.is_floating_point():
        bias = mask
    else:
        allowed = torch.ones(tq, tk, dtype=torch.bool, device=device).tril_() if causal else None
        if mask is not None:
            allowed = mask if allowed is None else mask & allowed
        bias = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
    if bool(torch.isneginf(bias).all(-1).any()):
        raise ValueError("attention mask leaves a query with no key to attend to")
    return bias.view((1,) * (4 - bias.dim()) + tuple(bias.shape))


def attention_mask_once(mask: torch.Tensor | None, causal: bool, tq: int, tk: int, like: torch.Tensor,
                        rate: float) -> tuple[torch.Tensor | None, bool]:
    """``(mask, causal)`` for a stack of :func:`attention` calls that share them: when the CPU path will
    run, its additive mask, built here once instead of in every layer; otherwise as given."""
    if rate and _fast_path(like) and (mask is not None or causal):
        return additive_mask(mask, causal, tq, tk, like.dtype, like.device), False
    return mask, causal


def dropout_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rate: float,
                      mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    """The chunked CPU attention on ``(B, H, T, d)`` float32/float64 CPU tensors: ``dropout(softmax(q k^T /
    sqrt(d) + mask), rate) @ v``; ``mask`` boolean, True where attention is allowed, broadcastable to
    ``(B, 1, T_q, T_k)``; ``causal`` as ``is_causal`` (``T_q == T_k``)."""
    b, h, tq, d = q.shape
    tk = k.shape[2]
    flat = lambda x, t: x.reshape(b * h, t, x.shape[-1])  # noqa: E731
    bias = additive_mask(mask, causal, tq, tk, q.dtype, q.device)
    q3, k3, v3 = flat(q * d ** -0.5, tq), flat(k, tk), flat(v, tk)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        out = _DropoutAttention.apply(q3, k3, v3, bias, h, rate)
    else:
        out = _attend(q3, k3, v3, bias, h, rate, keep_for_backward=False)[0].transpose(1, 2)
    return out.reshape(b, h, tq, v.shape[-1])


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rate: float, mask: torch.Tensor | None = None,
              causal: bool = False) -> torch.Tensor:
    """``scaled_dot_product_attention(q, k, v, mask, dropout_p=rate, is_causal=causal)``, in distribution:
    :func:`dropout_attention` when it has dropout to do on the CPU, else that call itself."""
    if rate and _fast_path(q):
        return dropout_attention(q, k, v, rate, mask, causal)
    if mask is not None and mask.is_floating_point():  # an additive mask (attention_mask_once), e.g. under autocast
        mask = mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=rate, is_causal=causal)


class TransformerEncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` whose training-mode dropouts (attention weights, the feed-forward's and
    both residuals') take this module's paths; parameters, initialisation and evaluation unchanged.

    Only self-attention with at most a key-padding mask (``src_mask`` None, not causal) is rerouted."""

    def _sa_block(self, x: torch.Tensor, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
                  is_causal: bool = False) -> torch.Tensor:
        a = self.self_attn
        if (not self.training or not a.dropout or attn_mask is not None or is_causal or not a.batch_first
                or not a._qkv_same_embed_dim):
            return super()._sa_block(x, attn_mask, key_padding_mask, is_causal)
        b, t, d = x.shape
        q, k, v = (h.view(b, t, a.num_heads, d // a.num_heads).transpose(1, 2)
                   for h in F.linear(x, a.in_proj_weight, a.in_proj_bias).chunk(3, dim=-1))
        allowed = None
        if key_padding_mask is not None:  # boolean, or as nn.TransformerEncoder hands it on: 0 / -inf
            blocked = key_padding_mask if key_padding_mask.dtype == torch.bool else key_padding_mask == float("-inf")
            allowed = ~blocked[:, None, None, :] if bool(blocked.any()) else None
        out = attention(q, k, v, a.dropout, allowed)
        return dropout(a.out_proj(out.transpose(1, 2).reshape(b, t, d)), self.dropout1.p, True)

    def _ff_block(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super()._ff_block(x)
        h = dropout(self.activation(self.linear1(x)), self.dropout.p, True)
        return dropout(self.linear2(h), self.dropout2.p, True)
