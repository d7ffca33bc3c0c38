"""The CPU dropout paths (:mod:`mmrepro.models.dropout`): the same function as before, in distribution.

Dropout off: bit-for-bit today's attention (the module calling SDPA as before), and the chunked path the
plain formula within float32 rounding (odd lengths, part-full chunks). Dropout on: kept share and
scale of the weights, determinism per seed, nothing drawn in eval mode, and each output's
mean and variance over many independent draws against their exact values (and the gradients'
against PyTorch's own dropout), with 5-sigma bounds from the samples' own moments, so a check
would flake (seeds aside) with probability below 1e-4 yet catches a wrong rate (each test shows that it would).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmrepro.models import dropout as cpu_dropout
from mmrepro.models.dropout import TransformerEncoderLayer, dropout, dropout_attention, quantised_rate
from mmrepro.models.presets import PRESETS
from mmrepro.models import transformer
from mmrepro.models.transformer import Dropouts, MultiheadAttention

from test_presets import preset, tiny_batch

Z = 5.0  # bound on every z-score


def sdpa(q, k, v, rate, mask=None, causal=False):
    """The attention call of MultiheadAttention.forward before the CPU dropout path."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=rate, is_causal=causal)


def math_attention(q, k, v, mask=None, causal=False):
    """``softmax(q k^T / sqrt(d) + mask) @ v``, no dropout."""
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if causal:
        scores = scores.masked_fill(~torch.ones(scores.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


def mask_for(kind: str, b: int, tq: int, tk: int) -> tuple[torch.Tensor | None, bool]:
    if kind == "padded":
        mask = torch.ones(b, 1, 1, tk, dtype=torch.bool)
        mask[1, ..., tk // 2:] = False
        return mask, False
    if kind == "future":  # MulT's crossmodal future mask
        return (torch.arange(tk)[None] - torch.arange(tq)[:, None] <= abs(tk - tq))[None, None], False
    return None, kind == "causal"


@pytest.mark.parametrize("kind", ["none", "padded", "future", "causal"])
def test_dropout_off_is_todays_attention_bit_for_bit(kind, monkeypatch):
    """The module with attention dropout 0 against the same module calling SDPA as it did before."""
    torch.manual_seed(0)
    attn = MultiheadAttention(8, 2, dropout=0.0)
    x = torch.randn(3, 5, 8, requires_grad=True)
    src = x if kind == "causal" else torch.randn(3, 7, 8, requires_grad=True)
    mask, causal = mask_for(kind, 3, 5, src.shape[1])
    for training in (True, False):
        attn.train(training)
        key = None if kind == "causal" else src
        ours = attn(x, key, mask=mask, causal=causal)
        with monkeypatch.context() as m:
            m.setattr(transformer, "attention", sdpa)
            ref = attn(x, key, mask=mask, causal=causal)
        assert torch.equal(ours, ref)
        g = torch.randn_like(ours)
        assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(ours, (x, src, *attn.parameters()), g),
                                                     torch.autograd.grad(ref, (x, src, *attn.parameters()), g)))


@pytest.mark.parametrize("chunk_bytes", [1 << 20, 2 * 7 * 9 * 8, 5 * 7 * 9 * 8])  # one chunk; in a sample; whole ones
@pytest.mark.parametrize("kind", ["none", "padded", "future", "causal"])
def test_chunked_attention_without_drops_is_the_arithmetic(kind, chunk_bytes, monkeypatch):
    """At rate 0 the chunked path computes softmax(q k^T / sqrt(d) + mask) v and its gradients."""
    monkeypatch.setattr(cpu_dropout, "CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(0)
    tk = 7 if kind == "causal" else 9
    q = torch.randn(3, 4, 7, 5, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(3, 4, tk, 5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    mask, causal = mask_for(kind, 3, 7, tk)
    ours, ref = dropout_attention(q, k, v, 0.0, mask, causal), math_attention(q, k, v, mask, causal)
    assert torch.allclose(ours, ref, atol=1e-12)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert torch.allclose(a, b, atol=1e-12)


SLICE32 = 7 * 11 * 4  # bytes of one (T_q = 7) x (T_k = 11) float32 score slice


@pytest.mark.parametrize("chunk_bytes", [1 << 20, 3 * SLICE32, 8 * SLICE32])  # one chunk; in a sample; last part-full
@pytest.mark.parametrize("kind", ["none", "padded"])
def test_chunked_attention_without_drops_matches_the_plain_reference_in_float32(kind, chunk_bytes, monkeypatch):
    """float32 at odd lengths (7 queries, 11 keys, 3 samples x 4 heads: with 8 slices a chunk, the last
    chunk is half full): the forward and the gradients within float32 rounding of the plain formula."""
    monkeypatch.setattr(cpu_dropout, "CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(0)
    q = torch.randn(3, 4, 7, 5, requires_grad=True)
    k, v = (torch.randn(3, 4, 11, 5, requires_grad=True) for _ in range(2))
    mask, _ = mask_for(kind, 3, 7, 11)
    ours, ref = dropout_attention(q, k, v, 0.0, mask), math_attention(q, k, v, mask)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(ours, (q, k, v), g)
    for a, b in zip(grads, torch.autograd.grad(ref, (q, k, v), g)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    if kind == "padded":  # sample 1's padded keys get no gradient
        assert torch.all(grads[1][1, :, 11 // 2:] == 0) and torch.all(grads[2][1, :, 11 // 2:] == 0)


def test_a_query_with_no_key_is_refused():
    q = torch.randn(1, 1, 2, 4)
    mask = torch.tensor([[True, True], [False, False]])[None, None]
    with pytest.raises(ValueError, match="no key to attend to"):
        dropout_attention(q, q, q, 0.1, mask)


# --- dropout on: the distribution ----------------------------------------------------------------


def moment_z(samples: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z-scores of the samples' mean and variance (dimension 0 is the draw) against exact values."""
    n = samples.shape[0]
    centred = samples - samples.mean(0)
    s2 = centred.pow(2).mean(0)
    se_var = ((centred.pow(4).mean(0) - s2 ** 2) / n).sqrt()
    return (samples.mean(0) - mean) / (var / n).sqrt(), (s2 - var) / se_var


def two_sample_var_z(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """z-scores of the difference of two sets of samples' variances."""
    def var_se(x):
        c = x - x.mean(0)
        s2 = c.pow(2).mean(0)
        return s2, (c.pow(4).mean(0) - s2 ** 2) / x.shape[0]
    (va, ea), (vb, eb) = var_se(a), var_se(b)
    return (va - vb) / (ea + eb).sqrt()


N, H, TQ, TK, HD, RATE = 20000, 1, 2, 6, 2, 0.3


def attention_draws(rate: float, fn=dropout_attention):
    """N independent draws (one per batch row) of one attention's output and of the gradients of
    ``<w, out>`` with respect to q, k and v."""
    g = torch.Generator().manual_seed(0)
    q0, k0, v0 = (torch.randn(1, H, t, HD, generator=g, dtype=torch.float64) for t in (TQ, TK, TK))
    w = torch.randn(1, H, TQ, HD, generator=g, dtype=torch.float64)
    q, k, v = (t.expand(N, -1, -1, -1).clone().requires_grad_() for t in (q0, k0, v0))
    out = fn(q, k, v, rate)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    exact = dict(q=q0, k=k0, v=v0, w=w)
    return out.detach(), [gr.detach() for gr in grads], exact


def test_attention_dropout_has_the_exact_mean_and_variance():
    torch.manual_seed(1)
    out, _, e = attention_draws(RATE)
    p = (e["q"] @ e["k"].transpose(-1, -2) * HD ** -0.5).softmax(-1)[0]
    r = quantised_rate(RATE)
    mean = p @ e["v"][0]
    var = r / (1 - r) * (p ** 2) @ (e["v"][0] ** 2)  # independent keeps, each weight scaled by 1 / (1 - r)
    z_mean, z_var = moment_z(out, mean, var)
    assert z_mean.abs().max() < Z and z_var.abs().max() < Z
    # the check has the power to see a wrong rate: drawn at 0.25, the variances are 22% too small
    torch.manual_seed(1)
    wrong, _, _ = attention_draws(0.25)
    assert moment_z(wrong, mean, var)[1].abs().max() > Z


def test_attention_dropout_gradients_are_distributed_as_pytorchs():
    torch.manual_seed(2)
    _, ours, e = attention_draws(RATE)
    torch.manual_seed(3)
    _, torchs, _ = attention_draws(RATE, lambda q, k, v, rate: F.scaled_dot_product_attention(q, k, v, dropout_p=rate))
    q, k, v = (e[n].clone().requires_grad_() for n in "qkv")
    expected = torch.autograd.grad((math_attention(q, k, v) * e["w"]).sum(), (q, k, v))  # E[grad] = grad of E[out]
    for o, t, mean in zip(ours, torchs, expected):
        se = o.std(0) / N ** 0.5
        assert ((o.mean(0) - mean[0]) / se).abs().max() < Z
        assert two_sample_var_z(o, t).abs().max() < Z
    torch.manual_seed(2)
    _, wrong, _ = attention_draws(0.25)
    assert max(two_sample_var_z(w, t).abs().max() for w, t in zip(wrong, torchs)) > Z


def test_activation_dropout_keeps_at_the_rate_and_scales():
    torch.manual_seed(0)
    n, r = 200_000, quantised_rate(0.15)
    x = torch.ones(n, requires_grad=True)
    y = dropout(x, 0.15, True)
    kept = y != 0
    assert torch.all(~kept | torch.isclose(y, torch.tensor(1 / (1 - r))))
    se = (r * (1 - r) / n) ** 0.5
    assert abs(kept.double().mean() - (1 - r)) / se < Z
    assert abs(kept.double().mean() - 0.9) / se > Z and abs(kept.double().mean() - 0.8) / se > Z  # not 0.1, not 0.2
    y.backward(torch.full((n,), 2.0))
    assert torch.equal(x.grad, 2 * y.detach())
    assert dropout(x, 0.15, False) is x and torch.equal(dropout(x.double(), 0.0, True), x.double())


def test_keep_masks_stay_independent_across_a_draw():
    """Neighbouring elements share a 32-bit draw: their keeps must not be correlated."""
    torch.manual_seed(0)
    n = 400_000
    keep = (cpu_dropout.keep_mask(n, 0.5) != 0).double()
    pairs = keep.view(-1, 2)
    corr = ((pairs[:, 0] - 0.5) * (pairs[:, 1] - 0.5)).mean() / 0.25
    assert abs(corr) < Z / (n / 2) ** 0.5


@pytest.mark.parametrize("padded", [False, True])
def test_attention_keeps_weights_at_one_minus_the_rate_and_scales_the_kept(padded, monkeypatch):
    """With ``v`` the identity, the output is the dropped weights themselves: each is 0 or its softmax
    weight / (1 - r), and the kept share over 2**17 weights (several chunks) is 1 - r within a
    binomial bound. Padded keys stay at 0."""
    monkeypatch.setattr(cpu_dropout, "CHUNK_BYTES", 8 * 33 * 16 * 8)  # 8 slices a chunk: 32 chunks
    torch.manual_seed(0)
    b, h, tq, tk = 64, 4, 33, 16
    q, k = torch.randn(b, h, tq, 8, dtype=torch.float64), torch.randn(b, h, tk, 8, dtype=torch.float64)
    v = torch.eye(tk, dtype=torch.float64).expand(b, h, tk, tk)
    mask = (torch.arange(tk) < 11)[None, None, None] if padded else None
    r = quantised_rate(RATE)
    weights = math_attention(q, k, v, mask)
    out = dropout_attention(q, k, v, RATE, mask)
    if padded:
        assert torch.all(out[..., 11:] == 0)
        out, weights = out[..., :11], weights[..., :11]
    kept = out != 0
    assert torch.allclose(out[kept], weights[kept] / (1 - r), rtol=1e-12, atol=0)
    n = kept.numel()
    share = kept.double().mean().item()
    assert abs(share - (1 - r)) < Z * (r * (1 - r) / n) ** 0.5
    assert abs(share - 0.75) > Z * (0.25 * 0.75 / n) ** 0.5  # a rate of 0.25 would be seen


def test_masked_attention_dropout_has_the_no_dropout_mean():
    """With padded keys too: the mean over many draws is the no-dropout output (5 sigma)."""
    torch.manual_seed(4)
    mask = (torch.arange(TK) < 4)[None, None, None]
    out, _, e = attention_draws(RATE, lambda q, k, v, rate: dropout_attention(q, k, v, rate, mask))
    p = math_attention(e["q"], e["k"], e["v"], mask)[0]
    se = out.std(0) / N ** 0.5
    assert ((out.mean(0) - p) / se).abs().max() < Z


def test_same_seed_same_draws_other_seed_other_draws():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 4, requires_grad=True) for _ in range(3))
    x = torch.randn(1000)
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        out = dropout_attention(q, k, v, RATE)
        runs.append((out, torch.autograd.grad(out.sum(), (q, k, v)), dropout(x, RATE, True)))
    (out_a, grads_a, act_a), (out_b, grads_b, act_b), (out_c, _, act_c) = runs
    assert torch.equal(out_a, out_b) and torch.equal(act_a, act_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    assert not torch.equal(out_a, out_c) and not torch.equal(act_a, act_c)


def test_eval_mode_draws_nothing_and_training_does():
    """A transformer with every dropout at 0.3: in eval mode it is the same encoder with dropouts 0
    (bit for bit, and the random state untouched); in training, two calls differ."""
    from mmrepro.models.transformer import TransformerEncoder

    torch.manual_seed(0)
    dropping = TransformerEncoder(8, 2, 2, Dropouts(attn=0.3, relu=0.3, res=0.3, embed=0.3), causal=True)
    plain = TransformerEncoder(8, 2, 2, Dropouts(), causal=True)
    plain.load_state_dict(dropping.state_dict())
    x, source = torch.randn(2, 5, 8), torch.randn(2, 7, 8)
    dropping.eval(), plain.eval()
    state = torch.get_rng_state()
    for args in ((x,), (x, source)):
        assert torch.equal(dropping(*args), plain(*args))
    assert torch.equal(torch.get_rng_state(), state)
    dropping.train()
    for args in ((x,), (x, source)):
        first, second = dropping(*args), dropping(*args)
        assert not torch.equal(first, second)


# --- in the models -------------------------------------------------------------------------------


def _step(model, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(batch).pred.pow(2).mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("name", PRESETS)
def test_seeded_training_steps_repeat_in_deterministic_mode(name):
    model = preset(name, dropouts={"attn": 0.2, "relu": 0.2, "res": 0.2, "embed": 0.2}).train()
    batch = tiny_batch()
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            torch.manual_seed(7)
            runs.append([_step(model, batch) for _ in range(2)])
    finally:
        torch.use_deterministic_algorithms(was)
    (loss_a, grads_a), (loss_b, grads_b) = runs[0][1], runs[1][1]
    assert torch.equal(loss_a, loss_b) and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    assert not torch.equal(runs[0][0][0], loss_a)  # and dropout is on: another draw, another loss


def test_transformer_encoder_layer_keeps_pytorchs_layer_and_masks_padded_keys():
    torch.manual_seed(0)
    make = lambda cls, p: nn.TransformerEncoder(cls(8, 2, 32, p, batch_first=True, norm_first=True), 2,  # noqa: E731
                                                enable_nested_tensor=False)
    theirs, ours = make(nn.TransformerEncoderLayer, 0.0), make(TransformerEncoderLayer, 0.0)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 5, 8)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[1, 3:] = True
    for training in (True, False):
        theirs.train(training), ours.train(training)
        assert torch.equal(theirs(x, src_key_padding_mask=pad), ours(x, src_key_padding_mask=pad))
    dropping = make(TransformerEncoderLayer, 0.3).train()
    moved = x.clone()
    moved[1, 3:] += 5.0
    outs = []
    for inputs in (x, moved):
        torch.manual_seed(1)
        outs.append(dropping(inputs, src_key_padding_mask=pad))
    assert torch.allclose(outs[0][1, :3], outs[1][1, :3], atol=1e-5)  # padded keys unseen, same draws


def test_presets_train_on_the_cpu_paths():
    """A preset's attention and other dropouts go through this module while training on the CPU."""
    model = preset("mplmm_mult", dropouts={"attn": 0.1, "relu": 0.1, "res": 0.1, "embed": 0.1}).train()
    out = model(tiny_batch()).pred
    names, seen, todo = set(), set(), [out.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            names.add(type(fn).__name__)
            todo += [nxt for nxt, _ in fn.next_functions]
    assert {"_DropoutAttentionBackward", "_DropoutBackward"} <= names
    assert Dropouts().attn == 0.0  # the default: no dropout unless a preset or config asks


def test_an_encoder_builds_its_additive_mask_once_for_all_layers(monkeypatch):
    from mmrepro.models.transformer import TransformerEncoder

    builds = []
    real = cpu_dropout.additive_mask

    def counting(mask, *args):
        if mask is None or not mask.is_floating_point():
            builds.append(1)
        return real(mask, *args)
    monkeypatch.setattr(cpu_dropout, "additive_mask", counting)
    enc = TransformerEncoder(8, 2, 3, Dropouts(attn=0.1), causal=True).train()
    x, source = torch.randn(2, 5, 8), torch.randn(2, 7, 8)
    enc(x), enc(x, source)  # causal self-attention (T_q = T_k), MulT's crossmodal future mask
    assert len(builds) == 2
