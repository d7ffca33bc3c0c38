"""Wander (low-rank sequence multimodal adapter): equality with the explicit outer-product fusion,
the parameter formula, freezing, identity at initialisation, gradients and padding."""

from __future__ import annotations

import copy

import pytest
import torch

from mmrepro.data.loader import Batch
from mmrepro.data.schema import DatasetSchema, ModalitySpec, TaskSpec
from mmrepro.methods.peft.wander import (Wander, WanderAdapter, WanderFusion, WanderLayerwiseModel,
                                         explicit_elements, explicit_outer_product, wander_param_count)
from mmrepro.methods.registry import TRANSFORMS, build
from mmrepro.methods.transforms import count_parameters
from mmrepro.models import build_model

REG = TaskSpec("score", "regression", value_range=(-3.0, 3.0))
CLS = TaskSpec("label", "classification", num_classes=3)


def schema(lengths=(6, 4, 3), dims=(5, 3, 2)) -> DatasetSchema:
    mods = tuple(ModalitySpec(n, length=t, dim=d) for n, t, d in zip("abcd", lengths, dims))
    return DatasetSchema(name="tiny", modalities=mods, tasks=(REG, CLS), splits=("train",))


def tiny_model(backbone="late", sch=None, task=REG, layers=1, seed=0):
    torch.manual_seed(seed)
    return build_model(sch or schema(), task, backbone=backbone, d_model=8, layers=layers, heads=2, kernel=1,
                       dropout=0.1, fusion_layers=1)


def make_batch(sch, n=5, seed=1, full=False) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = {m.name: torch.randn(n, m.length, m.dim, generator=g) + 1.0 for m in sch.modalities}
    lengths = {m.name: (torch.full((n,), m.length) if full else torch.randint(1, m.length + 1, (n,), generator=g))
               for m in sch.modalities}
    return Batch(x=x, lengths=lengths, present=torch.ones(n, len(sch.modalities), dtype=torch.bool),
                 y=torch.randn(n, generator=g), index=torch.arange(n))


def random_inputs(dims, lengths, B=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    toks = [torch.randn(B, T, d, generator=g, dtype=dtype) for d, T in zip(dims, lengths)]
    valid = [torch.randint(1, T + 1, (B,), generator=g) for T in lengths]
    pads = [torch.arange(T)[None, :] >= v[:, None] for T, v in zip(lengths, valid)]
    return toks, pads


SMALL = dict(rank=2, drank=2, trank=3, common_length=2, hidden=3)


# ---------------------------------------------------------------------------------------------
# The definition, written here from scratch (no code shared with the module): project, build the
# outer product of the M whole projected sequences and the weight tensor from its factors,
# contract, read out, up-project.


def reference_output(adapter, toks, pads, *, readout="mean", residual="pooled"):
    """Paper form, by the definition: sum over (j, k) of prod_m S_m^j[t_m, l] D_m^k[i_m, e] as one
    explicit weight tensor over the outer product of the projected sequences."""
    z = []
    for m, (x, pad) in enumerate(zip(toks, pads)):
        w, b = adapter.down[m].weight, adapter.down[m].bias
        h = 0.5 * (x @ w.T + b) * (1 + torch.erf((x @ w.T + b) / 2 ** 0.5))  # exact GELU
        if adapter.append_one:
            h = torch.cat([h, torch.ones(*h.shape[:-1], 1, dtype=h.dtype)], dim=-1)
        z.append(h * (~pad).unsqueeze(-1))
    B = z[0].shape[0]
    outer = z[0].reshape(B, -1)
    for zm in z[1:]:
        outer = torch.einsum("bp,bq->bpq", outer, zm.reshape(B, -1)).reshape(B, -1)
    weight = 0
    for j in range(adapter.trank):
        for k in range(adapter.drank):
            w = None
            for m, zm in enumerate(z):
                S = adapter.token_factors[m][j, : zm.shape[1]]  # (T, L)
                D = adapter.feature_factors[m][k]  # (r', h)
                g = torch.einsum("tl,ie->tile", S, D).reshape(-1, S.shape[1], D.shape[1])
                w = g if w is None else torch.einsum("ple,qle->pqle", w, g).reshape(-1, S.shape[1], D.shape[1])
            weight = weight + w
    fused = torch.einsum("bp,ple->ble", outer, weight)
    if adapter.output == "tokens":  # placement "every": back to each modality's length, up to its width
        return [(torch.einsum("tl,ble->bte", adapter.back[m][: p.shape[1]], fused) @ adapter.up_tokens[m].weight.T
                 + adapter.up_tokens[m].bias) * (~p).unsqueeze(-1) for m, p in enumerate(pads)]
    if residual == "first_tokens":
        cat = torch.cat([x * (~p).unsqueeze(-1) for x, p in zip(toks, pads)], dim=1)
        fused = fused + cat[:, : fused.shape[1]]
    vec = fused.mean(1) if readout == "mean" else fused[:, 0]
    return vec @ adapter.up.weight.T + adapter.up.bias


@pytest.mark.parametrize("M", [2, 3])
@pytest.mark.parametrize("append_one", [False, True])
@pytest.mark.parametrize("readout", ["mean", "first_token"])
def test_paper_form_equals_the_explicit_outer_product(M, append_one, readout):
    dims, lengths = [3, 4, 5][:M], [3, 2, 4][:M]
    torch.manual_seed(M)
    adapter = WanderAdapter(dims, lengths, 7, append_one=append_one, readout=readout, **SMALL).double()
    adapter.reset_parameters(zero_output=False)
    toks, pads = random_inputs(dims, lengths, seed=M)
    fast = adapter(toks, pads)
    assert fast.shape == (3, 7)
    torch.testing.assert_close(fast, reference_output(adapter, toks, pads, readout=readout), rtol=1e-10, atol=1e-12)
    other = "first_token" if readout == "mean" else "mean"  # the readout is really checked
    assert not torch.allclose(fast, reference_output(adapter, toks, pads, readout=other))


def test_token_output_equals_the_explicit_outer_product():
    dims, lengths = [3, 4, 2], [3, 2, 4]
    torch.manual_seed(0)
    adapter = WanderAdapter(dims, lengths, output="tokens", append_one=True, **SMALL).double()
    adapter.reset_parameters(zero_output=False)
    toks, pads = random_inputs(dims, lengths)
    for a, b in zip(adapter(toks, pads), reference_output(adapter, toks, pads)):
        assert a.abs().max() > 1e-3
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_paper_form_with_the_first_tokens_residual_and_the_module_reference():
    dims, lengths = [4, 4, 4], [3, 2, 4]
    torch.manual_seed(0)
    adapter = WanderAdapter(dims, lengths, 5, residual="first_tokens", readout="first_token",
                            **{**SMALL, "hidden": 4}).double()
    adapter.reset_parameters(zero_output=False)
    toks, pads = random_inputs(dims, lengths)
    ref = reference_output(adapter, toks, pads, readout="first_token", residual="first_tokens")
    torch.testing.assert_close(adapter(toks, pads), ref, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(ref, reference_output(adapter, toks, pads, readout="first_token"))
    # the module's own slow path (used by the benchmark) agrees with the definition too
    torch.testing.assert_close(explicit_outer_product(adapter, toks, pads, full_sequence=True), ref,
                               rtol=1e-10, atol=1e-12)


def test_a_wrong_down_projection_fails_the_reference():
    dims, lengths = [3, 4], [3, 2]
    torch.manual_seed(1)
    adapter = WanderAdapter(dims, lengths, 7, **SMALL).double()
    adapter.reset_parameters(zero_output=False)
    toks, pads = random_inputs(dims, lengths)
    ref = reference_output(adapter, toks, pads)
    with torch.no_grad():
        adapter.down[1].weight.mul_(1.01)
    assert not torch.allclose(adapter(toks, pads), ref)


def code_transcription(adapter, toks):
    """The released code's adapter, step by step (full sequences, no masks): down + GELU, the drank
    slices summed into one (r, dim) matrix, the trank slices into one (T, r) matrix, product across
    modalities, back to (B, r, dim), plus the first r tokens of the concatenated inputs; position 0."""
    original = torch.cat(toks, dim=1)
    fusion = None
    for m, x in enumerate(toks):
        h = torch.nn.functional.gelu(x @ adapter.down[m].weight.T + adapter.down[m].bias)  # (B, T, r)
        h = h @ adapter.feature_factors[m].sum(dim=0)  # (B, T, dim)
        h = h.permute(0, 2, 1) @ adapter.token_factors[m].sum(dim=0)  # (B, dim, r)
        fusion = h if fusion is None else fusion * h
    fusion = fusion.permute(0, 2, 1) + original[:, : fusion.shape[2], :]
    return fusion[:, 0]


@pytest.mark.parametrize("M", [2, 3])
def test_code_form_equals_a_transcription_of_the_released_code(M):
    dim, lengths = 4, [3, 5, 4][:M]
    torch.manual_seed(M)
    adapter = WanderAdapter([dim] * M, lengths, dim, rank=2, drank=3, trank=2, hidden=dim, factor_form="code",
                            readout="first_token", residual="first_tokens").double()
    adapter.reset_parameters()
    with torch.no_grad():  # identity up-projection: the adapter's output is the code's
        adapter.up.weight.copy_(torch.eye(dim, dtype=torch.float64))
        adapter.up.bias.zero_()
    toks, pads = random_inputs([dim] * M, lengths, seed=M)
    pads = [torch.zeros_like(p) for p in pads]  # the code has no padding
    code = code_transcription(adapter, toks)
    torch.testing.assert_close(adapter(toks, pads), code, rtol=1e-10, atol=1e-12)
    paper = WanderAdapter([dim] * M, lengths, dim, rank=2, drank=3, trank=2, hidden=dim, readout="first_token",
                          residual="first_tokens").double()
    paper.load_state_dict(adapter.state_dict())
    assert not torch.allclose(paper(toks, pads), code)  # with drank, trank > 1 the two forms differ


def test_switches_reach_the_adapter_and_keep_the_count():
    model = tiny_model("late")
    t = build(TRANSFORMS, "wander", {"rank": 3, "drank": 2, "trank": 2, "factor_form": "code",
                                     "readout": "first_token", "residual": "first_tokens"})
    count = t.adapter_param_count(model)
    assert count == wander_param_count([8, 8, 8], [6, 4, 3], 24, rank=3, drank=2, trank=2, hidden=8)
    t.apply(model)
    a = model.fusion.adapter
    assert (a.factor_form, a.readout_mode, a.residual, a.hidden) == ("code", "first_token", "first_tokens", 8)
    assert sum(p.numel() for p in a.parameters()) == count
    with pytest.raises(ValueError, match="readout"):
        Wander(placement="every", readout="first_token")
    with pytest.raises(ValueError, match="factor_form"):
        Wander(factor_form="tucker")
    with pytest.raises(ValueError, match="hidden"):
        WanderAdapter([4, 4], [2, 2], 3, rank=2, hidden=3, residual="first_tokens")


def test_explicit_elements_counts_the_tensors():
    assert explicit_elements(3, [2, 2], batch=4, trank=2, common_length=2, hidden=5) == 2 * 4 * 2 * 9 + 9 * 5
    assert (explicit_elements(3, [2, 4], batch=4, trank=2, common_length=2, hidden=5, full_sequence=True)
            == 4 * 72 + 72 * 10)


# ---------------------------------------------------------------------------------------------
# Parameters


def test_param_formula_by_hand_and_module_count():
    # down 3*(8*4+4)=108, feature factors 3*2*4*4=96, token factors 3*4*(6+4+3)=156, up 4*24+24=120
    kw = dict(rank=4, drank=2, trank=3)
    assert wander_param_count([8, 8, 8], [6, 4, 3], 24, **kw) == 480
    assert wander_param_count([8, 8, 8], [6, 4, 3], 24, append_one=True, **kw) == 480 + 3 * 2 * 1 * 4
    for out, extra in (("pooled", {}), ("tokens", {"placement": "every"})):
        for cfg in (dict(kw), dict(rank=3, drank=5, trank=2, common_length=7, hidden=6, append_one=True)):
            a = WanderAdapter([8, 5, 6, 2], [6, 4, 3, 9], 24 if out == "pooled" else None, output=out, **cfg)
            n = sum(p.numel() for p in a.parameters())
            assert n == wander_param_count([8, 5, 6, 2], [6, 4, 3, 9], 24, **cfg, **extra)


@pytest.mark.parametrize("backbone", ["late", "mult"])
@pytest.mark.parametrize("train_head", [True, False])
def test_apply_freezes_backbone_and_counts(backbone, train_head):
    model = tiny_model(backbone)
    total0 = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in model.head.parameters())
    t = build(TRANSFORMS, "wander", {"rank": 4, "drank": 2, "trank": 3, "train_head": train_head})
    assert isinstance(t, Wander)
    formula = t.adapter_param_count(model)
    assert formula == wander_param_count([8, 8, 8], [6, 4, 3], 24, rank=4, drank=2, trank=3)
    budget = t.param_count(model)
    assert budget == formula + (head if train_head else 0)
    out = t.apply(model)
    assert out is model and isinstance(model.fusion, WanderFusion)
    trainable, total = count_parameters(model)
    assert trainable == budget == t.param_count(model)  # predicted from the backbone, same after apply
    assert total == total0 + formula
    allowed = ("fusion.adapter.", "head.") if train_head else ("fusion.adapter.",)
    for name, p in model.named_parameters():
        assert p.requires_grad == name.startswith(allowed), name


def test_every_layer_placement_counts_and_freezes():
    model = tiny_model("mult", layers=2)
    t = Wander(rank=3, drank=2, trank=2, placement="every")
    formula = t.adapter_param_count(model)
    assert formula == wander_param_count([8, 8, 8], [6, 4, 3], rank=3, drank=2, trank=2, placement="every", layers=2)
    head = sum(p.numel() for p in model.head.parameters())
    assert t.param_count(model) == formula + head
    t.apply(model)
    assert type(model) is WanderLayerwiseModel and len(model.wander) == 2
    assert count_parameters(model)[0] == formula + head == t.param_count(model)
    for name, p in model.named_parameters():
        assert p.requires_grad == name.startswith(("wander.", "head.")), name


def test_bad_parameters_raise():
    with pytest.raises(ValueError, match="placement"):
        Wander(placement="middle")
    with pytest.raises(TypeError, match="bad parameters"):
        build(TRANSFORMS, "wander", {"ranks": 3})


# ---------------------------------------------------------------------------------------------
# Behaviour in the model


@pytest.mark.parametrize("backbone,placement,task", [("late", "last", REG), ("mult", "last", CLS),
                                                     ("mult", "every", REG)])
def test_starts_as_the_frozen_backbone(backbone, placement, task):
    model = tiny_model(backbone, task=task, layers=2).eval()
    frozen = copy.deepcopy(model).requires_grad_(False)  # frozen weights may take other (fast-path) kernels
    Wander(rank=4, drank=2, trank=3, placement=placement).apply(model)
    model.eval()
    batch = make_batch(schema())
    with torch.no_grad():
        ref, out = frozen(batch), model(batch)
    torch.testing.assert_close(out.pred, ref.pred, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.fused, ref.fused, rtol=1e-5, atol=1e-6)
    if placement == "last":  # the adapter adds an exact zero
        assert torch.equal(out.pred, ref.pred)


@pytest.mark.parametrize("placement", ["last", "every"])
def test_gradients_reach_the_adapter_and_only_it(placement):
    model = tiny_model("late", layers=2)
    Wander(rank=4, drank=2, trank=3, placement=placement).apply(model)
    model.train()
    adapter = model.fusion.adapter if placement == "last" else model.wander
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    batch = make_batch(schema(), n=6)
    for step in range(2):
        opt.zero_grad()
        out = model(batch)
        ((out.pred - batch.y) ** 2).mean().backward()
        ups = [adapter.up] if placement == "last" else list(adapter[0].up_tokens)
        assert all(u.weight.grad.abs().sum() > 0 for u in ups)  # the zero-initialised output gets signal at once
        if step == 1:  # after one update, every adapter parameter does
            for name, p in adapter.named_parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0, name
        opt.step()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
    assert not torch.allclose(model(batch).pred, out.pred)  # training changed the prediction


def test_padded_positions_do_not_change_the_output():
    dims, lengths = [4, 3, 5], [5, 4, 6]
    torch.manual_seed(0)
    for output in ("pooled", "tokens"):
        adapter = WanderAdapter(dims, lengths, 6 if output == "pooled" else None, output=output, append_one=True,
                                rank=3, drank=2, trank=2).double()
        adapter.reset_parameters(zero_output=False)
        toks, pads = random_inputs(dims, lengths, B=4)
        base = adapter(toks, pads)
        noisy = [t.masked_fill(p.unsqueeze(-1), 1e3) + 0 * t for t, p in zip(toks, pads)]  # garbage where padded
        torch.testing.assert_close(adapter(noisy, pads), base, rtol=1e-12, atol=1e-12)
        # the same sequences padded to a shorter batch length (only padding removed) give the same result
        short = [int((~p).sum(1).max()) for p in pads]
        out_short = adapter([t[:, :s] for t, s in zip(toks, short)], [p[:, :s] for p, s in zip(pads, short)])
        if output == "pooled":
            torch.testing.assert_close(out_short, base, rtol=1e-12, atol=1e-12)
        else:
            for a, b, s in zip(out_short, base, short):
                torch.testing.assert_close(a, b[:, :s], rtol=1e-12, atol=1e-12)
                assert torch.all(b[:, s:] == 0)


def test_two_modalities_and_the_model_ignores_padding_values():
    sch = schema(lengths=(5, 4), dims=(3, 2))
    model = tiny_model("mult", sch=sch)
    Wander(rank=3, drank=2, trank=2, append_one=True).apply(model)
    model.fusion.adapter.reset_parameters(zero_output=False)
    model.eval()
    batch = make_batch(sch)
    noisy = copy.deepcopy(batch)
    for m in sch.modality_names:
        pad = torch.arange(batch.x[m].shape[1])[None, :] >= batch.lengths[m][:, None]
        noisy.x[m] = batch.x[m].masked_fill(pad.unsqueeze(-1), 50.0)
    with torch.no_grad():
        torch.testing.assert_close(model(noisy).pred, model(batch).pred)


def test_transformed_model_survives_copy_and_state_dict_round_trip():
    model = tiny_model("late", layers=2)
    Wander(rank=3, drank=2, trank=2, placement="every").apply(model)
    for p in model.wander.parameters():
        torch.nn.init.normal_(p, std=0.1)
    model.eval()
    batch = make_batch(schema())
    clone = copy.deepcopy(model)
    assert type(clone) is WanderLayerwiseModel
    fresh = tiny_model("late", layers=2, seed=5)
    Wander(rank=3, drank=2, trank=2, placement="every").apply(fresh)
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(clone(batch).pred, model(batch).pred)
        torch.testing.assert_close(fresh(batch).pred, model(batch).pred)
