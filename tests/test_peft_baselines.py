"""PEFT baselines (linear probe, LoRA, Houlsby/Pfeiffer adapters, prompt tuning) on tiny backbones:
exact trainable parameters (count by formula and by name), zero-init identity, updates confined to
the trainable parameters, the fused evaluation kernel never bypassing a method, and prompts that
leave padded positions ignored."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmrepro.data.loader import Batch
from mmrepro.data.schema import DatasetSchema, ModalitySpec, TaskSpec
from mmrepro.methods.peft.baselines import LoRALinear, head_count, transformer_layers
from mmrepro.methods.registry import TRANSFORMS, build
from mmrepro.methods.transforms import count_parameters
from mmrepro.models import MultimodalModel, build_model
from mmrepro.models.fusion import CrossmodalBlock

CLS = TaskSpec("cls", "classification", num_classes=3)
REG = TaskSpec("score", "regression", value_range=(-3.0, 3.0))
SCHEMA = DatasetSchema(
    name="tiny",
    modalities=(ModalitySpec("a", length=6, dim=5), ModalitySpec("b", length=4, dim=3)),
    tasks=(CLS, REG),
    splits=("train",),
)
D, M, L, FL, B = 8, 2, 2, 1, 5
BACKBONES = ["late", "mult"]
R, ALPHA, BOTTLENECK, N_PROMPTS = 2, 4.0, 3, 2

METHODS = {
    "linear_probe": {},
    "lora": {"r": R, "alpha": ALPHA, "dropout": 0.1},
    "adapter_houlsby": {"bottleneck": BOTTLENECK, "activation": "gelu"},
    # smooth activations: with a 3-wide ReLU bottleneck every unit of a layer can start dead, and then
    # its down-projection never moves in the two-step test below (default ReLU is covered separately)
    "adapter_pfeiffer": {"bottleneck": BOTTLENECK, "activation": "silu"},
    "prompt_tuning": {"n_prompts": N_PROMPTS},
}
ZERO_INIT = ["lora", "adapter_houlsby", "adapter_pfeiffer"]


def backbone(name: str, task: TaskSpec = CLS, seed: int = 0) -> MultimodalModel:
    torch.manual_seed(seed)
    return build_model(SCHEMA, task, backbone=name, d_model=D, layers=L, heads=2, kernel=1, dropout=0.0,
                       fusion_layers=FL)


def transformed(method: str, bb: str, task: TaskSpec = CLS, **params) -> tuple[MultimodalModel, MultimodalModel, Any]:
    """``(frozen backbone copy, transformed model, transform)``."""
    base = backbone(bb, task)
    transform = build(TRANSFORMS, method, {**METHODS[method], **params})
    return copy.deepcopy(base), transform.apply(base), transform


def batch(seed: int = 0, pad_value: float = 0.0, task: TaskSpec = CLS) -> Batch:
    g = torch.Generator().manual_seed(seed)
    lengths = {"a": [6, 3, 1, 5, 2], "b": [4, 2, 3, 1, 4]}
    x = {"a": torch.randn(B, 6, 5, generator=g), "b": torch.randn(B, 4, 3, generator=g)}
    for m in x:
        for i, n in enumerate(lengths[m]):
            x[m][i, n:] = pad_value
    y = torch.tensor([0, 2, 1, 1, 0]) if task.type == "classification" else torch.randn(B, generator=g)
    return Batch(x=x, lengths={m: torch.tensor(v) for m, v in lengths.items()},
                 present=torch.ones(B, M, dtype=torch.bool), y=y, index=torch.arange(B))


def n_layers(bb: str) -> int:
    return M * L + (M * (M - 1) * FL + M if bb == "mult" else 0)


def closed_form(method: str, bb: str, k: int = 3) -> int:
    """The docstring's formulas written out for this tiny model (d = 8, M = 2, L = 2, ff width 2d)."""
    f = M * D
    head = 2 * (f * f + f) + f * k + k
    return {
        "linear_probe": f * k + k,
        "lora": n_layers(bb) * 12 * R * D + head,
        "adapter_houlsby": n_layers(bb) * 2 * (2 * D * BOTTLENECK + D + BOTTLENECK) + head,
        "adapter_pfeiffer": n_layers(bb) * (2 * D * BOTTLENECK + D + BOTTLENECK) + head,
        "prompt_tuning": M * N_PROMPTS * D + head,
    }[method]


def expected_names(method: str, base: MultimodalModel) -> set[str]:
    """The method's parameter names, derived from the backbone's module layout."""
    head = {f"head.{n}" for n, _ in base.head.named_parameters()}
    if method == "linear_probe":
        return {"head.out.weight", "head.out.bias"}
    if method == "prompt_tuning":
        return head | {f"prompts.{m}" for m in base.names}
    names = set(head)
    for prefix, mod in base.named_modules():
        if not prefix.startswith(("encoders.", "fusion.")):
            continue
        if isinstance(mod, nn.TransformerEncoderLayer):
            attn, ffs, outs = "self_attn", ("linear1", "linear2"), {"attention": "dropout1", "ff": "dropout2"}
        elif isinstance(mod, CrossmodalBlock):
            attn, ffs, outs = "attn", ("ff.0", "ff.3"), {"attention": "attn", "ff": "ff"}
        else:
            continue
        if method == "lora":
            for ab in "AB":
                names |= {f"{prefix}.{attn}.parametrizations.in_proj_weight.0.lora_{ab}",
                          f"{prefix}.{attn}.out_proj.parametrizations.weight.0.lora_{ab}",
                          *(f"{prefix}.{lin}.lora.lora_{ab}" for lin in ffs)}
        else:
            sublayers = ("attention", "ff") if method == "adapter_houlsby" else ("ff",)
            names |= {f"{prefix}.{outs[s]}.adapter.{lin}.{p}" for s in sublayers for lin in ("down", "up")
                      for p in ("weight", "bias")}
    return names


def trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def randomise_trainable(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# ---------------------------------------------------------------------------------------------
# Exactly the method's parameters train


@pytest.mark.parametrize("bb", BACKBONES)
@pytest.mark.parametrize("method", list(METHODS))
def test_trainable_parameters_match_formula_and_names(method, bb):
    base, model, transform = transformed(method, bb)
    expected = closed_form(method, bb)
    assert transform.param_count(base) == expected  # predicted from the backbone alone
    trainable, total = count_parameters(model)
    assert trainable == expected == transform.param_count(model)
    added = 0 if method == "linear_probe" else expected - head_count(base)
    assert total == count_parameters(base)[1] + added
    assert trainable_names(model) == expected_names(method, base)


@pytest.mark.parametrize("method", ["lora", "adapter_houlsby", "adapter_pfeiffer", "prompt_tuning"])
def test_without_head_only_the_method_trains(method):
    base, model, transform = transformed(method, "mult", task=REG, train_head=False)
    expected = closed_form(method, "mult", k=1) - head_count(base)
    assert count_parameters(model)[0] == transform.param_count(base) == expected
    assert not any(n.startswith("head.") for n in trainable_names(model))


@pytest.mark.parametrize("target,per_layer", [(["qkv"], 4), (["attn_out"], 2), (["ff"], 6), (["qkv", "ff"], 10)])
def test_lora_target_subsets(target, per_layer):
    base, model, transform = transformed("lora", "mult", target=target, train_head=False)
    assert count_parameters(model)[0] == transform.param_count(base) == n_layers("mult") * per_layer * R * D


# ---------------------------------------------------------------------------------------------
# Zero init, the update itself, and the fused evaluation kernel


@pytest.mark.parametrize("bb", BACKBONES)
@pytest.mark.parametrize("method", ZERO_INIT)
def test_zero_init_predicts_as_the_backbone(method, bb):
    base, model, _ = transformed(method, bb)
    b = batch()
    for train in (True, False):
        base.train(train), model.train(train)
        torch.testing.assert_close(model(b).pred, base(b).pred, atol=1e-6, rtol=0)
        with torch.no_grad():  # evaluation without gradients may take PyTorch's fused encoder-layer kernel
            torch.testing.assert_close(model(b).pred, base(b).pred, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bb", BACKBONES)
@pytest.mark.parametrize("method", ["lora", "adapter_houlsby", "adapter_pfeiffer", "prompt_tuning"])
def test_fused_kernel_never_bypasses_the_method(method, bb):
    """With the method's parameters non-zero the prediction moves, and evaluation without
    gradients (fused kernel allowed) equals evaluation with them (module-by-module path)."""
    base, model, _ = transformed(method, bb, train_head=False)
    randomise_trainable(model)
    base.eval(), model.eval()
    b = batch()
    slow = model(b).pred
    with torch.no_grad():
        fast = model(b).pred
        assert not torch.allclose(fast, base(b).pred, atol=1e-3)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_adapter_default_is_a_relu_bottleneck_and_starts_as_identity():
    base, model, _ = transformed("adapter_pfeiffer", "mult", activation="relu")
    adapter = model.fusion.cross["a->b"][0].ff.adapter
    assert isinstance(adapter.act, nn.ReLU) and build(TRANSFORMS, "adapter_pfeiffer").activation == "relu"
    assert adapter.down.weight.shape == (BOTTLENECK, D) and torch.all(adapter.up.weight == 0)
    base.eval(), model.eval()
    torch.testing.assert_close(model(batch()).pred, base(batch()).pred, atol=1e-6, rtol=0)


def test_lora_update_is_the_scaled_low_rank_product():
    _, model, _ = transformed("lora", "mult", dropout=0.0)
    randomise_trainable(model)
    layer = model.encoders["a"].transformer.layers[0]
    p = layer.self_attn.parametrizations.in_proj_weight
    a, b_ = p[0].lora_A, p[0].lora_B
    assert a.shape == (R, D) and b_.shape == (3 * D, R)
    torch.testing.assert_close(layer.self_attn.in_proj_weight, p.original + ALPHA / R * b_ @ a)
    lin = layer.linear1
    assert isinstance(lin, LoRALinear) and lin.lora.lora_A.shape == (R, D) and lin.lora.lora_B.shape == (2 * D, R)
    x = torch.randn(4, D)
    torch.testing.assert_close(lin(x), F.linear(x, lin.base.weight + ALPHA / R * lin.lora.lora_B @ lin.lora.lora_A,
                                                lin.base.bias))


def test_lora_dropout_acts_on_the_feed_forward_branch_in_training_only():
    _, model, _ = transformed("lora", "late", dropout=0.5)
    randomise_trainable(model)
    lin = model.encoders["a"].transformer.layers[0].linear1
    x = torch.randn(64, D)
    lin.train()
    assert not torch.allclose(lin(x), lin(x))
    lin.eval()
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias))


# ---------------------------------------------------------------------------------------------
# Training moves exactly the trainable parameters


@pytest.mark.parametrize("bb", BACKBONES)
@pytest.mark.parametrize("method", list(METHODS))
def test_optimizer_steps_change_only_trainable_parameters(method, bb):
    """Two steps: the first moves B / up-projections (their partners get zero gradient while those are zero)."""
    _, model, _ = transformed(method, bb, dropout=0.0) if method == "lora" else transformed(method, bb)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(2):
        b = batch(seed=step)
        opt.zero_grad()
        F.cross_entropy(model(b).pred, b.y).backward()
        opt.step()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[n]), f"trainable {n} did not move"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} moved"


# ---------------------------------------------------------------------------------------------
# Prompt tuning and padding


@pytest.mark.parametrize("bb", BACKBONES)
def test_prompt_tuning_keeps_padded_positions_ignored(bb):
    base, model, _ = transformed("prompt_tuning", bb)
    randomise_trainable(model)
    base.eval(), model.eval()
    b = batch(pad_value=0.0)
    with torch.no_grad():
        out = model(b)
        # padding values never matter
        torch.testing.assert_close(model(batch(pad_value=1e3)).pred, out.pred)
        # nor how much padding there is: sample 1 alone, cut to its own lengths
        i, la, lb = 1, 3, 2
        alone = Batch(x={"a": b.x["a"][i:i + 1, :la], "b": b.x["b"][i:i + 1, :lb]},
                      lengths={"a": torch.tensor([la]), "b": torch.tensor([lb])},
                      present=torch.ones(1, M, dtype=torch.bool), y=b.y[i:i + 1], index=torch.tensor([0]))
        torch.testing.assert_close(model(alone).pred[0], out.pred[i], atol=1e-5, rtol=1e-5)
        # prompts are removed after the encoder and padded tokens stay zero; prompts do change the prediction
        for m, n in (("a", 6), ("b", 4)):
            assert out.tokens[m].shape == (B, n, D)
            pad = torch.arange(n)[None, :] >= b.lengths[m][:, None]
            assert torch.all(out.tokens[m][pad] == 0)
        assert not torch.allclose(out.pred, base(b).pred, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Registration, parameters, applying twice


def test_registered_names():
    for name in METHODS:
        assert name in TRANSFORMS and TRANSFORMS.get(name).name == name


@pytest.mark.parametrize("method,params", [
    ("lora", {"r": 0}), ("lora", {"alpha": 0}), ("lora", {"dropout": 1.0}), ("lora", {"target": ["q"]}),
    ("lora", {"target": []}), ("adapter_houlsby", {"bottleneck": 0}), ("adapter_pfeiffer", {"activation": "elu"}),
    ("prompt_tuning", {"n_prompts": 0}),
])
def test_bad_hyperparameters_raise(method, params):
    with pytest.raises(ValueError):
        build(TRANSFORMS, method, params)


def test_unknown_hyperparameter_raises():
    with pytest.raises(TypeError, match="bad parameters"):
        build(TRANSFORMS, "lora", {"rank": 4})


@pytest.mark.parametrize("method", ["lora", "adapter_houlsby", "prompt_tuning"])
def test_applying_twice_raises(method):
    _, model, transform = transformed(method, "mult")
    with pytest.raises((ValueError, TypeError)):
        transform.apply(model)


def test_transformer_layers_cover_encoders_and_fusion():
    assert len(transformer_layers(backbone("late"))) == n_layers("late") == M * L
    assert len(transformer_layers(backbone("mult"))) == n_layers("mult")
