"""Multimodal PEFT baselines of the Wander comparison (UniAdapter, PMF, MMA) on tiny backbones with
2, 3 and 5 modalities: exact trainable parameters (formula and names), identity at initialisation
where the method starts there, which parts are shared across modalities, cross-modal information flow,
training, padding, missing modalities and modality subsets, copying and state dicts."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmrepro.data.loader import Batch
from mmrepro.data.schema import DatasetSchema, ModalitySpec, TaskSpec
from mmrepro.methods.peft.baselines import head_count
from mmrepro.methods.peft.mma import MMAEncoderLayer
from mmrepro.methods.peft.pmf import PMFModel
from mmrepro.methods.peft.uniadapter import UniAdaptedCrossmodalBlock, UniAdaptedEncoderLayer
from mmrepro.methods.registry import TRANSFORMS, build
from mmrepro.methods.settings import ZeroFill
from mmrepro.methods.transforms import count_parameters
from mmrepro.models import MultimodalModel, build_model

CLS = TaskSpec("cls", "classification", num_classes=3)
LENGTHS, DIMS = (6, 4, 5, 3, 7), (5, 3, 2, 4, 6)
D, FL, B = 8, 1, 5
BOTTLENECK, MMA_B, QP, QCP, FCP, HIDDEN = 3, 4, 2, 1, 3, 5
METHODS = {
    "uniadapter": {"bottleneck": BOTTLENECK},
    "mma": {"bottleneck": MMA_B, "scale": 0.1},
    "pmf": {"n_qp": QP, "n_qcp": QCP, "n_fcp": FCP, "hidden": HIDDEN},
}
CONTAINER = {"uniadapter": "uniadapter", "mma": "mma", "pmf": "pmf"}


def schema(M: int) -> DatasetSchema:
    mods = tuple(ModalitySpec(f"m{i}", length=t, dim=d) for i, t, d in zip(range(M), LENGTHS, DIMS))
    return DatasetSchema(name="tiny", modalities=mods, tasks=(CLS,), splits=("train",))


def backbone(M: int, bb: str = "late", depth: int = 2, seed: int = 0, modalities=None) -> MultimodalModel:
    torch.manual_seed(seed)
    return build_model(schema(M), CLS, backbone=bb, d_model=D, layers=depth, heads=2, kernel=1, dropout=0.0,
                       fusion_layers=FL, modalities=modalities)


def transformed(method: str, M: int, bb: str = "late", depth: int = 2, **params):
    """``(frozen backbone copy, transformed model, transform)`` on encoders of ``depth`` layers."""
    base = backbone(M, bb, depth)
    transform = build(TRANSFORMS, method, {**METHODS[method], **params})
    frozen = copy.deepcopy(base).requires_grad_(False)
    return frozen, transform.apply(base), transform


def batch(M: int, seed: int = 0, pad_value: float = 0.0, names=None) -> Batch:
    g = torch.Generator().manual_seed(seed)
    names = names or [f"m{i}" for i in range(M)]
    sch = {s.name: s for s in schema(max(int(n[1:]) for n in names) + 1).modalities}
    x, lengths = {}, {}
    for m in names:
        T, d = sch[m].length, sch[m].dim
        lengths[m] = torch.randint(1, T + 1, (B,), generator=g)
        lengths[m][0] = T
        x[m] = torch.randn(B, T, d, generator=g)
        x[m][torch.arange(T)[None, :] >= lengths[m][:, None]] = pad_value
    return Batch(x=x, lengths=lengths, present=torch.ones(B, len(names), dtype=torch.bool),
                 y=torch.tensor([0, 2, 1, 1, 0]), index=torch.arange(B))


def randomise(module: nn.Module, std: float = 0.3, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------
# The formulas, written out independently of the modules


def closed_form(method: str, M: int, bb: str, depth: int = 2, train_head: bool = True) -> int:
    dims, head = [D] * M, head_count(backbone(M, bb, depth))
    if method == "uniadapter":
        b = BOTTLENECK
        unit = 2 * D + D * b + b + M * (b * D + D)
        n = depth * unit + ((FL * (unit + b * D + D + 2 * D) + unit) if bb == "mult" else 0)  # late, concat: encoders
    elif method == "mma":
        b, k = MMA_B, math.ceil(2 * depth / 3)
        n = k * (sum(2 * d * b + b + d for d in dims) + b * b + b)
    else:
        k = min(2, depth)
        pairs = M * (M - 1) * ((QP + QCP) * D + D * HIDDEN + HIDDEN + HIDDEN * D + D)
        n = k * (pairs + M * FCP * D)
    return n + (head if train_head else 0)


def expected_names(method: str, M: int, bb: str, depth: int = 2) -> set[str]:
    """The method's parameter names, from its documented structure."""
    lin = ("weight", "bias")
    names = [f"m{i}" for i in range(M)]
    if method == "uniadapter":
        def unit(prefix: str, cross: bool) -> set[str]:
            out = {f"{prefix}.{p}.{w}" for p in ("norm", "down") for w in lin}
            out |= {f"{prefix}.up.{i}.{w}" for i in range(M) for w in lin}
            return out | ({f"{prefix}.{p}.{w}" for p in ("cross_up", "cross_norm") for w in lin} if cross else set())
        out = set().union(*(unit(f"uniadapter.encoder.{l}", False) for l in range(depth)))
        if bb == "mult":
            out |= set().union(*(unit(f"uniadapter.cross.{j}", True) for j in range(FL)))
            out |= unit("uniadapter.fusion_self.0", False)
        return out
    if method == "mma":
        k = math.ceil(2 * depth / 3)
        return ({f"mma.{j}.{p}.{i}.{w}" for j in range(k) for p in ("down", "up") for i in range(M) for w in lin}
                | {f"mma.{j}.shared.{w}" for j in range(k) for w in lin})
    out = set()
    for k in range(min(2, depth)):
        for s, t in itertools.permutations(names, 2):
            out |= {f"pmf.{k}.query.{s}->{t}", f"pmf.{k}.query_context.{s}->{t}"}
            out |= {f"pmf.{k}.translate.{s}->{t}.linear{i}.{w}" for i in (1, 2) for w in lin}
        out |= {f"pmf.{k}.fusion_context.{m}" for m in names}
    return out


@pytest.mark.parametrize("bb", ["late", "mult", "concat"])
@pytest.mark.parametrize("M", [2, 3, 5])
@pytest.mark.parametrize("method", list(METHODS))
def test_trainable_parameters_match_formula_and_names(method, M, bb):
    base, model, transform = transformed(method, M, bb)
    expected = closed_form(method, M, bb)
    assert transform.param_count(base) == expected  # predicted from the backbone alone
    n_trainable, total = count_parameters(model)
    assert n_trainable == expected == transform.param_count(model)
    assert total == count_parameters(base)[1] + expected - head_count(base)  # only the method's parameters were added
    head = {f"head.{n}" for n, _ in base.head.named_parameters()}
    assert trainable(model) == expected_names(method, M, bb) | head


@pytest.mark.parametrize("method", list(METHODS))
def test_without_head_only_the_method_trains(method):
    base, model, transform = transformed(method, 3, "mult", train_head=False)
    assert count_parameters(model)[0] == transform.param_count(base) == closed_form(method, 3, "mult", train_head=False)
    assert trainable(model) == expected_names(method, 3, "mult")


def test_formula_follows_depth_and_layer_choices():
    # MMA adapts the top two thirds of each encoder by default (3 -> 2 layers), or the number asked for
    unit = 2 * (2 * D * MMA_B + MMA_B + D) + MMA_B ** 2 + MMA_B
    for depth, k in ((1, 1), (3, 2), (4, 3)):
        _, model, t = transformed("mma", 2, depth=depth, train_head=False)
        assert count_parameters(model)[0] == t.param_count(model) == k * unit
        kinds = [type(x) for x in model.encoders["m0"].transformer.layers]
        assert kinds == [nn.TransformerEncoderLayer] * (depth - k) + [MMAEncoderLayer] * k
    _, model, t = transformed("mma", 2, depth=3, train_head=False, layers=1)
    kinds = [type(x) for x in model.encoders["m1"].transformer.layers]
    assert kinds == [nn.TransformerEncoderLayer] * 2 + [MMAEncoderLayer]
    assert count_parameters(model)[0] == unit
    # PMF: fusion_layers defaults to min(2, L); one fusion layer holds half the prompts of two
    for depth in (1, 3):
        _, model, t = transformed("pmf", 2, depth=depth, train_head=False)
        assert count_parameters(model)[0] == closed_form("pmf", 2, "late", depth, train_head=False)
    one = build(TRANSFORMS, "pmf", {**METHODS["pmf"], "fusion_layers": 1, "train_head": False})
    assert 2 * one.param_count(backbone(2, depth=3)) == closed_form("pmf", 2, "late", 3, train_head=False)
    # UniAdapter: one unit per encoder depth
    _, model, t = transformed("uniadapter", 2, depth=3, train_head=False)
    assert len(model.uniadapter["encoder"]) == 3
    assert count_parameters(model)[0] == closed_form("uniadapter", 2, "late", 3, train_head=False)


# ---------------------------------------------------------------------------------------------
# Start: UniAdapter exactly the frozen model, MMA close to it in proportion to its scale, PMF not


@pytest.mark.parametrize("bb", ["late", "mult", "concat"])
@pytest.mark.parametrize("M", [2, 3])
def test_uniadapter_starts_as_the_frozen_model(M, bb):
    base, model, _ = transformed("uniadapter", M, bb)
    b = batch(M)
    for train in (True, False):
        base.train(train), model.train(train)
        torch.testing.assert_close(model(b).pred, base(b).pred, atol=1e-6, rtol=0)
        with torch.no_grad():
            torch.testing.assert_close(model(b).pred, base(b).pred, atol=1e-6, rtol=0)
    # and it is the up-projections' zeros that make it so
    randomise(model.uniadapter)
    assert not torch.allclose(model(b).pred, base(b).pred, atol=1e-3)


def test_mma_starts_near_the_frozen_model_in_proportion_to_its_scale():
    b = batch(3)
    diffs = []
    for scale in (1e-3, 1e-4):
        base, model, _ = transformed("mma", 3, "mult", scale=scale)
        base.eval(), model.eval()
        diffs.append((model(b).pred - base(b).pred).abs().max().item())
    assert 0 < diffs[0] < 0.05
    assert 9.0 < diffs[0] / diffs[1] < 11.0  # first order in the scale: the adapters are live, not zero


def test_pmf_prompts_act_from_the_start():
    base, model, _ = transformed("pmf", 3)
    base.eval(), model.eval()
    assert not torch.allclose(model(batch(3)).pred, base(batch(3)).pred, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# What is shared across modalities and what is not


def _tokens(model, b):
    model.eval()
    with torch.no_grad():
        return model(b).tokens


@pytest.mark.parametrize("method,shared,own", [
    ("uniadapter", lambda mdl: mdl.uniadapter["encoder"][1].down, lambda mdl, i: mdl.uniadapter["encoder"][1].up[i]),
    ("mma", lambda mdl: mdl.mma[0].shared, lambda mdl, i: mdl.mma[0].down[i]),
])
def test_shared_projection_reaches_every_modality_and_own_projections_one(method, shared, own):
    M = 3
    _, model, _ = transformed(method, M)
    randomise(getattr(model, CONTAINER[method]))
    b = batch(M)
    before = _tokens(model, b)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # random, not constant, changes: a constant shift would vanish in the encoders' LayerNorm
        shared(model).weight.add_(torch.randn(shared(model).weight.shape, generator=g))
    after = _tokens(model, b)
    assert all(not torch.allclose(before[m], after[m]) for m in model.names)
    with torch.no_grad():
        own(model, 1).weight.add_(torch.randn(own(model, 1).weight.shape, generator=g))
    last = _tokens(model, b)
    assert [not torch.allclose(after[m], last[m]) for m in model.names] == [False, True, False]


def test_uniadapter_cross_modal_units_sit_in_the_fusion():
    _, model, _ = transformed("uniadapter", 3, "mult")
    blocks = [blk for blocks in model.fusion.cross.values() for blk in blocks]
    assert len(blocks) == 6 and all(type(blk) is UniAdaptedCrossmodalBlock for blk in blocks)
    assert all(blk._uniadapter[0] is model.uniadapter["cross"][0] for blk in blocks)
    assert {blk._uniadapter[1] for blk in model.fusion.cross["m0->m2"]} == {2}  # the query (target) modality
    assert all(type(x) is UniAdaptedEncoderLayer for enc in model.fusion.self_attn.values() for x in enc.layers)
    randomise(model.uniadapter)
    b = batch(3)
    model.eval()
    with torch.no_grad():
        before = model(b)
        model.uniadapter["cross"][0].cross_up.weight.add_(torch.randn(D, BOTTLENECK))
        after = model(b)
    # the cross-modal branch changes the fusion's output, not the encoders' tokens
    assert all(torch.equal(before.tokens[m], after.tokens[m]) for m in model.names)
    assert not torch.allclose(before.fused, after.fused)


def test_pmf_carries_information_between_encoders():
    base, model, _ = transformed("pmf", 3)
    b = batch(3)
    changed = copy.deepcopy(b)
    changed.x["m2"] = changed.x["m2"] + 1.0
    for mdl, crosses in ((base, False), (model, True)):
        out, out2 = _tokens(mdl, b), _tokens(mdl, changed)
        assert not torch.allclose(out["m2"], out2["m2"])
        for m in ("m0", "m1"):  # the frozen encoders are independent; PMF's are not
            assert torch.allclose(out[m], out2[m]) is not crosses


# ---------------------------------------------------------------------------------------------
# Training


@pytest.mark.parametrize("bb", ["late", "mult"])
@pytest.mark.parametrize("method", list(METHODS))
def test_steps_reduce_the_loss_and_move_only_the_method(method, bb):
    _, model, _ = transformed(method, 3, bb, train_head=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    b = batch(3)
    model.train()
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = F.cross_entropy(model(b).pred, b.y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[n]), f"trainable {n} did not move"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} moved"


def test_mma_gradient_rescaling_is_exact_forward_and_scales_the_adapter_gradient():
    grads = {}
    for rescale in (True, False):
        base, model, _ = transformed("mma", 2, scale=0.01, grad_rescale=rescale, train_head=False)
        b = batch(2)
        out = model(b).pred
        F.cross_entropy(out, b.y).backward()
        grads[rescale] = (out.detach(), model.mma[0].shared.weight.grad.clone())
    torch.testing.assert_close(grads[True][0], grads[False][0])  # the forward pass is the same
    torch.testing.assert_close(grads[True][1], grads[False][1] / 0.01)  # adapter gradients as if unscaled


# ---------------------------------------------------------------------------------------------
# Padding, missing modalities, subsets


@pytest.mark.parametrize("method", list(METHODS))
def test_padding_values_and_amount_never_matter(method):
    _, model, _ = transformed(method, 3, "mult")
    randomise(getattr(model, CONTAINER[method]), std=0.2)
    model.eval()
    b = batch(3)
    with torch.no_grad():
        out = model(b).pred
        torch.testing.assert_close(model(batch(3, pad_value=1e3)).pred, out)
        i = 1  # that sample alone, cut to its own lengths
        alone = Batch(x={m: b.x[m][i:i + 1, : int(b.lengths[m][i])] for m in model.names},
                      lengths={m: b.lengths[m][i:i + 1] for m in model.names},
                      present=b.present[i:i + 1], y=b.y[i:i + 1], index=torch.tensor([0]))
        torch.testing.assert_close(model(alone).pred[0], out[i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", list(METHODS))
def test_missing_modalities_zero_filled_and_empty(method):
    base, model, _ = transformed(method, 3, "mult")
    b = batch(3)
    b.present[1, 0] = b.present[2, 1] = b.present[3, 0] = b.present[3, 2] = False
    b = ZeroFill(0.5).transform(b)
    b.lengths["m1"][4] = 0  # and one sample whose sequence is empty
    model.eval(), base.eval()
    with torch.no_grad():
        out = model(b)
    assert torch.isfinite(out.pred).all() and out.pred.shape == (B, 3)
    assert torch.all(out.tokens["m1"][4] == 0)
    if method == "uniadapter":  # still the frozen model at the start, whatever is missing
        with torch.no_grad():
            torch.testing.assert_close(out.pred, base(b).pred, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", list(METHODS))
def test_a_subset_of_modalities_is_adapted_as_its_own_model(method):
    keep = ["m0", "m2"]
    base = backbone(3, "mult", modalities=keep)
    transform = build(TRANSFORMS, method, METHODS[method])
    expected = closed_form(method, 2, "mult")  # D and the layer layout do not depend on which modalities
    assert transform.param_count(base) == expected
    model = transform.apply(base)
    assert count_parameters(model)[0] == expected
    names = {n for n in trainable(model) if not n.startswith("head.")}
    assert names == {n.replace("m1", "m2") for n in expected_names(method, 2, "mult")}
    b = batch(3, names=keep)
    assert torch.isfinite(model(b).pred).all()
    one = build(TRANSFORMS, method, METHODS[method]).apply(backbone(3, "late", modalities=["m1"]))  # M = 1 too
    assert torch.isfinite(one(batch(3, names=["m1"])).pred).all()


# ---------------------------------------------------------------------------------------------
# Evaluation kernel, copies, state dicts, registration, parameters


@pytest.mark.parametrize("method", list(METHODS))
def test_eval_without_gradients_equals_eval_with_them(method):
    base, model, _ = transformed(method, 3, "mult")
    randomise(getattr(model, CONTAINER[method]), std=0.2)
    base.eval(), model.eval()
    b = batch(3)
    slow = model(b).pred
    with torch.no_grad():  # PyTorch's fused encoder-layer kernel may run here
        fast = model(b).pred
        assert not torch.allclose(fast, base(b).pred, atol=1e-3)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", list(METHODS))
def test_copy_and_state_dict_round_trip_keep_the_sharing(method):
    _, model, transform = transformed(method, 3, "mult")
    randomise(getattr(model, CONTAINER[method]), std=0.2)
    model.eval()
    clone = copy.deepcopy(model)
    fresh = build(TRANSFORMS, method, METHODS[method]).apply(backbone(3, "mult", seed=7))
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    b = batch(3)
    with torch.no_grad():
        torch.testing.assert_close(clone(b).pred, model(b).pred)
        torch.testing.assert_close(fresh(b).pred, model(b).pred)
    if method == "uniadapter":
        layer = clone.encoders["m1"].transformer.layers[1]
        assert layer._uniadapter[0] is clone.uniadapter["encoder"][1]  # shared, not copied apart
    elif method == "mma":
        assert clone.encoders["m2"].transformer.layers[1]._mma[0] is clone.mma[-1]
    else:
        assert type(clone) is PMFModel
    assert count_parameters(clone)[0] == transform.param_count(model)


def test_registered_names():
    for name in METHODS:
        assert name in TRANSFORMS and TRANSFORMS.get(name).name == name


@pytest.mark.parametrize("method,params", [
    ("uniadapter", {"bottleneck": 0}), ("uniadapter", {"scale": 0.0}), ("uniadapter", {"dropout": 1.0}),
    ("mma", {"bottleneck": 0}), ("mma", {"scale": -1.0}), ("mma", {"layers": 0}),
    ("pmf", {"n_qp": 0}), ("pmf", {"n_fcp": -1}), ("pmf", {"fusion_layers": 0}), ("pmf", {"hidden": 0}),
])
def test_bad_hyperparameters_raise(method, params):
    with pytest.raises(ValueError):
        build(TRANSFORMS, method, params)


@pytest.mark.parametrize("method,params", [("mma", {"layers": 3}), ("pmf", {"fusion_layers": 3})])
def test_more_layers_than_the_encoders_have_raise(method, params):
    with pytest.raises(ValueError, match="layers"):
        build(TRANSFORMS, method, params).apply(backbone(2, depth=2))


@pytest.mark.parametrize("method", list(METHODS))
def test_models_without_token_encoders_raise(method):
    class Other(nn.Module):
        names = ["m0", "m1"]
        encoders = nn.ModuleDict({"m0": nn.Linear(2, 2), "m1": nn.Linear(2, 2)})
    with pytest.raises(TypeError, match="per-modality transformer encoders"):
        build(TRANSFORMS, method, METHODS[method]).apply(Other())


@pytest.mark.parametrize("method", list(METHODS))
def test_applying_twice_raises(method):
    _, model, transform = transformed(method, 2)
    with pytest.raises((ValueError, TypeError)):
        transform.apply(model)
