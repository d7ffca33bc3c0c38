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
# The definition: equal to building the outer product and the CP-reconstructed weight tensor


@pytest.mark.parametrize("M", [2, 3, 4])
@pytest.mark.parametrize("append_one", [False, True])
@pytest.mark.parametrize("full_sequence", [False, True])
def test_equals_explicit_outer_product(M, append_one, full_sequence):
    dims, lengths = [3, 4, 5, 2][:M], [3, 2, 4, 3][:M]
    torch.manual_seed(M)
    adapter = WanderAdapter(dims, lengths, 7, append_one=append_one, **SMALL).double()
    adapter.reset_parameters(zero_output=False)
    toks, pads = random_inputs(dims, lengths, seed=M)
    fast = adapter(toks, pads)
    slow = explicit_outer_product(adapter, toks, pads, full_sequence=full_sequence)
    assert fast.shape == (3, 7)
    assert fast.abs().max() > 1e-3  # not trivially zero
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)


def test_equals_explicit_for_token_output_and_the_fused_sequence():
    dims, lengths = [3, 4, 2], [3, 2, 4]
    torch.manual_seed(0)
    adapter = WanderAdapter(dims, lengths, output="tokens", append_one=True, **SMALL).double()
    adapter.reset_parameters(zero_output=False)
    toks, pads = random_inputs(dims, lengths)
    for a, b in zip(adapter(toks, pads), explicit_outer_product(adapter, toks, pads, full_sequence=True)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # the fused (B, L, h) sequence itself, against a direct elementwise sum over every index tuple (M = 2)
    a2 = WanderAdapter([3, 2], [2, 3], 4, **SMALL).double()
    toks, pads = random_inputs([3, 2], [2, 3], B=2)
    z = a2.project(toks, pads)
    S, D = a2.token_factors, a2.feature_factors
    ref = torch.zeros(2, 2, 3, dtype=torch.float64)
    for t1 in range(2):
        for i1 in range(2):
            for t2 in range(3):
                for i2 in range(2):
                    w = sum(S[0][j, t1, :, None] * D[0][k, i1] * S[1][j, t2, :, None] * D[1][k, i2]
                            for j in range(3) for k in range(2))  # (L, h)
                    ref += (z[0][:, t1, i1] * z[1][:, t2, i2])[:, None, None] * w
    torch.testing.assert_close(a2.fuse(z), ref, rtol=1e-10, atol=1e-12)


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
