"""Every PEFT method on the papers' backbones: on ``casp_late`` (Wander's MOSI base) each trains one
step with only its own parameters and the head moving, the backbone bit-identical, and exactly the
count its formula gives; on ``casp_early`` the layer-level methods do the same and the ones that need
per-modality encoders say so."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import SCHEMA as SCHEMA_PATH, default_config

from mmrepro.config import ConfigError, load_schema, validate_config
from mmrepro.data.loader import Batch, SplitLoader
from mmrepro.data.schema import DatasetSchema, ModalitySpec, TaskSpec
from mmrepro.methods.registry import HOOKS, TRANSFORMS, build
from mmrepro.models import build_model
from mmrepro.models.stages import StagedEncoder
from mmrepro.train import TrainConfig, fit

REG = TaskSpec("score", "regression", value_range=(-3.0, 3.0))
SCHEMA = DatasetSchema(name="tiny", modalities=(ModalitySpec("a", length=6, dim=5), ModalitySpec("b", length=4, dim=3),
                                                ModalitySpec("c", length=5, dim=2)),
                       tasks=(REG,), splits=("train",))
CLS = TaskSpec("label", "classification", num_classes=3)
SCHEMA_CLS = DatasetSchema(name="tiny_cls", modalities=SCHEMA.modalities, tasks=(CLS,), splits=("train", "valid"))
D, L, M, K, B = 8, 2, 3, 1, 4
LENGTHS = [6, 4, 5]
NO_DROPOUT = {k: 0.0 for k in ("attn", "relu", "res", "embed", "out")}

PARAMS = {
    "full_finetune": {},
    "linear_probe": {},
    "lora": {"r": 2, "alpha": 4.0},
    "adapter_houlsby": {"bottleneck": 3, "activation": "gelu"},
    "adapter_pfeiffer": {"bottleneck": 3, "activation": "gelu"},
    "prompt_tuning": {"n_prompts": 2},
    "uniadapter": {"bottleneck": 3},
    "pmf": {"n_qp": 2, "n_qcp": 1, "n_fcp": 1},
    "mma": {"bottleneck": 4, "scale": 0.1},
    "wander": {"rank": 3, "drank": 2, "trank": 2},
}
PER_MODALITY = ["prompt_tuning", "uniadapter", "pmf", "mma"]  # need one transformer encoder per modality


def head(backbone: str) -> int:
    """Prediction head: casp_late first maps ``M d -> d``; then residual MLP ``d -> d -> d`` and ``d -> K``."""
    pre = M * D * D + D if backbone == "casp_late" else 0
    return pre + 2 * (D * D + D) + D * K + K


def formula(method: str, backbone: str) -> int:
    """The methods' docstring formulas, written out for this model (layers of width d, feed-forward 4d)."""
    layers = M * L if backbone == "casp_late" else L  # per-modality encoders, or casp_early's one joint encoder
    fused = M * D if backbone == "casp_late" else D  # the fusion's output, where Wander adds its residual
    b, H = 3, head(backbone)
    if method == "linear_probe":
        return D * K + K
    if method == "lora":  # qkv r (d + 3d), out r 2d, fc1 r (d + 4d), fc2 r (4d + d)
        return layers * 2 * (4 * D + 2 * D + 5 * D + 5 * D) + H
    if method == "adapter_houlsby":
        return layers * 2 * (2 * D * b + D + b) + H
    if method == "adapter_pfeiffer":
        return layers * (2 * D * b + D + b) + H
    if method == "prompt_tuning":
        return M * 2 * D + H
    if method == "uniadapter":
        return L * (2 * D + (D * b + b) + M * (b * D + D)) + H
    if method == "pmf":  # K = min(2, L) fusion layers, translator width d // 2
        h, pairs = D // 2, M * (M - 1)
        return min(2, L) * (pairs * ((2 + 1) * D + D * h + h + h * D + D) + 1 * M * D) + H
    if method == "mma":  # the top ceil(2 L / 3) layers, bottleneck 4
        k, b4 = math.ceil(2 * L / 3), 4
        return k * (M * (D * b4 + b4 + b4 * D + D) + b4 * b4 + b4) + H
    if method == "wander":  # rank = common length = hidden 3, drank 2, trank 2
        r = 3
        return M * (D * r + r) + M * 2 * r * r + 2 * r * sum(LENGTHS) + (r * fused + fused) + H
    raise KeyError(method)


def model(backbone: str):
    torch.manual_seed(0)
    return build_model(SCHEMA, REG, backbone=backbone, d_model=D, layers=L, heads=2, kernel=1, dropout=0.0,
                       fusion_layers=1, dropouts=NO_DROPOUT)


def batch() -> Batch:
    g = torch.Generator().manual_seed(0)
    x = {s.name: torch.randn(B, s.length, s.dim, generator=g) for s in SCHEMA.modalities}
    lengths = {"a": [6, 3, 6, 2], "b": [4, 4, 1, 4], "c": [5, 5, 5, 5]}
    for m, ls in lengths.items():
        for i, n in enumerate(ls):
            x[m][i, n:] = 0.0
    return Batch(x=x, lengths={m: torch.tensor(v) for m, v in lengths.items()},
                 present=torch.ones(B, M, dtype=torch.bool), y=torch.randn(B, generator=g), index=torch.arange(B))


def one_step(method: str, backbone: str):
    base = model(backbone)
    before = {id(p): (n, p.detach().clone()) for n, p in base.named_parameters()}
    head_ids = {id(p) for p in base.head.parameters()}
    transform = build(TRANSFORMS, method, PARAMS[method])
    predicted = transform.param_count(base) if hasattr(transform, "param_count") else None
    adapted = transform.apply(base)
    trainable = [p for p in adapted.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=1e-2)
    b = batch()
    loss = torch.nn.functional.mse_loss(adapted(b).pred, b.y)
    loss.backward()
    opt.step()
    return adapted, before, head_ids, trainable, predicted, loss


@pytest.mark.parametrize("method,backbone", [(m, "casp_late") for m in PARAMS]
                         + [(m, "casp_early") for m in PARAMS if m not in PER_MODALITY])
def test_one_step_trains_only_the_method_and_counts_by_formula(method, backbone):
    adapted, before, head_ids, trainable, predicted, loss = one_step(method, backbone)
    assert torch.isfinite(loss)
    own = [p for p in trainable if id(p) not in before]
    n_trainable = sum(p.numel() for p in trainable)
    if method == "full_finetune":
        assert len(trainable) == len(before) and not own
        return
    assert n_trainable == formula(method, backbone) == predicted
    backbone_trainable = {before[id(p)][0] for p in trainable if id(p) in before and id(p) not in head_ids}
    assert not backbone_trainable, f"backbone parameters left trainable: {sorted(backbone_trainable)}"
    if method == "linear_probe":
        assert {before[id(p)][0] for p in trainable} == {"head.out.weight", "head.out.bias"}
    else:
        assert {id(p) for p in trainable} >= head_ids and own
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in own), "no own parameter got a gradient"
    still = {id(p) for p in adapted.parameters()}
    for pid, (name, value) in before.items():
        assert pid in still, f"{name} was replaced instead of frozen"
    moved = {n for p in adapted.parameters() if id(p) in before
             for n, v in [before[id(p)]] if not torch.equal(p.detach(), v)}
    frozen = {before[pid][0] for pid in before if pid not in head_ids}
    assert not moved & frozen, f"frozen backbone parameters changed: {sorted(moved & frozen)}"
    assert moved, "the head did not move"


def test_stage_interface_is_exposed_by_presets_and_light_encoders():
    for backbone, depth in (("casp_late", L), ("cggm_msa", L), ("casp_early", 0), ("late", L)):
        encoders = model(backbone).encoders
        assert all(isinstance(e, StagedEncoder) and len(e.layers) == depth and e.width == D for e in encoders.values())
        assert [e.max_len for e in encoders.values()] == LENGTHS


@pytest.mark.parametrize("backbone", ["casp_late", "late"])
def test_staged_run_equals_the_encoders_forward(backbone):
    """embed -> run_layer... -> finish is the encoder's forward (what prompt tuning, PMF and Wander drive)."""
    m, b = model(backbone).eval(), batch()
    for name, enc in m.encoders.items():
        h, pad, keys = enc.embed(b.x[name], b.lengths[name])
        for i in range(len(enc.layers)):
            h = enc.run_layer(i, h, keys)
        staged, _ = enc.finish(h, pad, keys)
        assert torch.allclose(staged, enc(b.x[name], b.lengths[name])[0], atol=1e-5)


@pytest.mark.parametrize("method,params", [(m, PARAMS[m]) for m in PER_MODALITY] + [("wander", {"placement": "every"})])
@pytest.mark.parametrize("backbone", ["casp_early", "mplmm_mult"])
def test_per_modality_methods_name_what_the_joint_backbones_lack(method, params, backbone):
    with pytest.raises(ValueError, match="per-modality transformer encoders"):
        build(TRANSFORMS, method, params).apply(model(backbone))


# --- the config names the mismatch before any job starts


def _peft_config(backbone: str, methods: list[str], study: str = "peft") -> dict:
    config = default_config()
    config["studies"][study].update(methods=methods, model={**config["studies"][study].get("model", {}),
                                                            "backbone": backbone, "d_model": 8, "heads": 2})
    return config


@pytest.mark.parametrize("backbone,method,study", [("casp_early", "pmf", "peft"), ("mplmm_mult", "prompt_tuning", "peft"),
                                                   ("casp_early", "cggm", "balance"), ("mplmm_mult", "late_qmf", "balance")])
def test_config_rejects_methods_that_need_modality_encoders_on_joint_backbones(backbone, method, study):
    with pytest.raises(ConfigError, match=rf"studies\.{study}\.methods\[0\]: '{method}' adapts per-modality"):
        validate_config(_peft_config(backbone, [method, "full_finetune"] if study == "peft" else [method, "joint"],
                                     study), load_schema(SCHEMA_PATH))


def test_config_accepts_every_peft_method_on_casp_late_and_the_layer_methods_on_casp_early():
    validate_config(_peft_config("casp_late", list(PARAMS)), load_schema(SCHEMA_PATH))
    validate_config(_peft_config("casp_early", [m for m in PARAMS if m not in PER_MODALITY]), load_schema(SCHEMA_PATH))


# --- the balance study's hooks on CGGM's model


def _arrays(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    out = {"ids": np.array([f"s{i}" for i in range(n)]), "y/label": rng.integers(0, 3, size=n).astype(np.int64)}
    for s in SCHEMA_CLS.modalities:
        out[f"x/{s.name}"] = rng.standard_normal((n, s.length, s.dim)).astype(np.float32)
        out[f"len/{s.name}"] = rng.integers(1, s.length + 1, size=n).astype(np.int64)
    return out


@pytest.mark.parametrize("method", ["ogm_ge", "agm", "pmr", "mslr", "greedy", "cggm"])
def test_balance_hooks_train_on_cggm_msa(method):
    torch.manual_seed(0)
    net = build_model(SCHEMA_CLS, CLS, backbone="cggm_msa", d_model=D, layers=1, heads=2, kernel=1, dropout=0.0,
                      fusion_layers=1)
    before = {n: p.detach().clone() for n, p in net.encoders.named_parameters()}
    train = SplitLoader(_arrays(32, 0), SCHEMA_CLS, "label", batch_size=16, shuffle=True, seed=0)
    valid = SplitLoader(_arrays(16, 1), SCHEMA_CLS, "label", batch_size=16, shuffle=False, seed=0)
    result = fit(net, train, valid, build(HOOKS, method, {}), TrainConfig(epochs=1, batch_size=16, lr=1e-3, device="cpu"))
    assert all(math.isfinite(v) for row in result.history for k, v in row.items() if isinstance(v, float))
    assert any(not torch.equal(p, before[n]) for n, p in net.encoders.named_parameters())
