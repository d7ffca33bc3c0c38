"""The papers' backbones: exact parameter counts, readouts, masks, the MulT stage API, the block's maths."""

from __future__ import annotations

import math

import pytest
import torch

from mmrepro.data.loader import Batch
from mmrepro.data.schema import DatasetSchema, ModalitySpec, TaskSpec
from mmrepro.models import build_model
from mmrepro.models.presets import PRESETS, MulTModel, preset_params
from mmrepro.models.transformer import Dropouts, MultiheadAttention, TransformerEncoder, sinusoidal_table

REG = TaskSpec("score", "regression", value_range=(-3.0, 3.0))
FOOD = TaskSpec("label", "classification", num_classes=101)
# CMU-MOSI as the issue measured it (text 50x768, audio 375x5, vision 500x20)
MOSI = DatasetSchema(name="mosi", modalities=(ModalitySpec("text", length=50, dim=768),
                                              ModalitySpec("audio", length=375, dim=5),
                                              ModalitySpec("vision", length=500, dim=20)),
                     tasks=(REG,), splits=("train",))
FOOD101 = DatasetSchema(name="food", modalities=(ModalitySpec("image", length=197, dim=768),
                                                 ModalitySpec("text", length=40, dim=768)),
                        tasks=(FOOD,), splits=("train",))
TINY = DatasetSchema(name="tiny", modalities=(ModalitySpec("a", length=6, dim=5), ModalitySpec("b", length=4, dim=3),
                                              ModalitySpec("c", length=5, dim=2)),
                     tasks=(REG,), splits=("train",))
B = 3


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def preset(name: str, schema=TINY, task=REG, *, d=8, layers=1, heads=2, fusion_layers=1, seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(schema, task, backbone=name, d_model=d, layers=layers, heads=heads, kernel=1, dropout=0.0,
                       fusion_layers=fusion_layers, dropouts=kw.pop("dropouts", {k: 0.0 for k in
                                                                                  ("attn", "relu", "res", "embed",
                                                                                   "out")}), **kw)


def tiny_batch(lengths=None, seed=0, schema=TINY) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = {m.name: torch.randn(B, m.length, m.dim, generator=g) for m in schema.modalities}
    lengths = lengths or {m.name: [m.length] * B for m in schema.modalities}
    lens = {m: torch.tensor(v) for m, v in lengths.items()}
    for m, v in lengths.items():
        for i, n in enumerate(v):
            x[m][i, n:] = 0.0
    return Batch(x=x, lengths=lens, present=torch.ones(B, len(x), dtype=torch.bool), y=torch.zeros(B),
                 index=torch.arange(B))


# --- parameter counts: the official models' (counted with the authors' code) and the formula


def test_official_parameter_counts_at_mosi_sizes():
    casp = build_model(MOSI, REG, backbone="casp_late", d_model=40, layers=5, heads=8, kernel=1, dropout=0.0,
                       fusion_layers=1)
    assert n_params(casp) == 336_041
    cggm = build_model(MOSI, REG, backbone="cggm_msa", d_model=40, layers=5, heads=5, kernel=1, dropout=0.0,
                       fusion_layers=3)
    assert n_params(cggm) == 390_441
    mult = build_model(MOSI, REG, backbone="mplmm_mult", d_model=30, layers=5, heads=5, kernel=1, dropout=0.0,
                       fusion_layers=1)
    assert n_params(mult) - n_params(mult.encoders) - n_params(mult.head.out) == 1_061_280


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("schema,task", [(MOSI, REG), (FOOD101, FOOD), (TINY, REG)])
def test_parameter_count_matches_the_docstring_formula(name, schema, task):
    d, layers, heads, fl = (30, 4, 5, 2) if name == "mplmm_mult" else (40, 4, 5, 2)
    m = build_model(schema, task, backbone=name, d_model=d, layers=layers, heads=heads, kernel=1, dropout=0.0,
                    fusion_layers=fl)
    out = 1 if task.type == "regression" else task.num_classes
    assert n_params(m) == preset_params(name, [s.dim for s in schema.modalities], d, layers, fl, out)


# --- readouts


@pytest.mark.parametrize("name,fused,rep", [("casp_late", 24, 24), ("casp_early", 8, 8), ("cggm_msa", 8, 8),
                                            ("cggm_food", 8, 8), ("mplmm_mult", 48, 48)])
def test_readout_shapes(name, fused, rep):
    out = preset(name)(tiny_batch())
    assert out.pred.shape == (B,) and out.fused.shape == (B, fused) and out.representation.shape == (B, rep)
    assert all(out.features[m].shape == (B, 8) for m in "abc")


def test_casp_late_representation_is_the_step0_concatenation_before_the_fusion_layer():
    model = preset("casp_late").eval()
    out = model(tiny_batch())
    assert torch.equal(out.representation, torch.cat([out.tokens[m][:, 0] for m in "abc"], dim=-1))
    assert torch.allclose(out.pred, model.head(out.representation).squeeze(-1))
    assert model.head.pre[0].in_features == 24 and model.head.pre[0].out_features == 8


def test_step0_readout_sees_the_whole_sequence_but_reads_step_0():
    """Fused output = the fusion encoder's step 0: recomputing it by hand from the tokens agrees."""
    model = preset("cggm_msa").eval()
    b = tiny_batch()
    out = model(b)
    h = torch.cat([out.tokens[m] for m in "abc"], dim=1)
    assert torch.allclose(out.fused, model.fusion.transformer(h)[:, 0], atol=1e-6)
    b.x["c"][:, -1] += torch.randn(B, 2)  # the last step of another modality still moves step 0 (attention)
    assert not torch.allclose(model(b).fused, out.fused)


# --- MulT's stage API (MPLMM)


def test_mult_stage_api_projection_and_memory_suffix():
    model = preset("mplmm_mult").eval()
    assert isinstance(model, MulTModel) and model.fusion.memory_dim == 16
    b = tiny_batch()
    projected, pads = model.project(b)
    assert {m: tuple(v.shape) for m, v in projected.items()} == {"a": (B, 6, 8), "b": (B, 4, 8), "c": (B, 5, 8)}
    plain = model(b)
    assert torch.allclose(model.forward_from_projected(projected, pads).pred, plain.pred)
    # (a) an edited projected sequence changes the prediction
    edited = {**projected, "b": projected["b"] + torch.randn_like(projected["b"])}
    assert not torch.allclose(model.forward_from_projected(edited, pads).pred, plain.pred)
    # (b, c) suffix tokens join the END of a memory input, whose last position is read out
    suffix = torch.randn(B, 2, 16)
    out = model.forward_from_projected(projected, pads, memory_suffix={"a": suffix})
    f = model.fusion
    streams = torch.cat([f.cross[f"{s}->a"](projected["a"], projected[s]) for s in "bc"], dim=-1)
    expect = f.memory["a"](torch.cat([streams, suffix], dim=1))[:, -1]
    assert torch.allclose(out.fused[:, :16], expect, atol=1e-6)
    assert torch.allclose(out.fused[:, 16:], plain.fused[:, 16:], atol=1e-6)  # other branches untouched
    assert not torch.allclose(out.fused[:, :16], plain.fused[:, :16])


def test_mplmm_mult_is_causal_by_default_and_configurable():
    assert all(enc.causal for enc in preset("mplmm_mult").fusion.cross.values())
    assert not any(enc.causal for enc in preset("mplmm_mult", causal=False).fusion.memory.values())
    assert not preset("casp_early").fusion.transformer.causal


# --- the block


def test_sinusoids_follow_fairseq_layout_and_padding_rule():
    table = sinusoidal_table(6, 9)
    half = 4
    w = [10000 ** (-i / (half - 1)) for i in range(half)]
    assert torch.allclose(table[3, :half], torch.tensor([math.sin(3 * x) for x in w]), atol=1e-6)
    assert torch.allclose(table[3, half:2 * half], torch.tensor([math.cos(3 * x) for x in w]), atol=1e-6)
    assert torch.all(table[:, -1] == 0) and torch.all(table[0] == 0)
    enc = TransformerEncoder(8, 2, 1, Dropouts(), position_padding=True)
    x = torch.randn(2, 4, 8)
    x[1, 2, 0] = 0.0  # the official rule: channel 0 exactly zero -> position 0 (zero vector)
    pos = enc.embed_positions(x)
    assert torch.all(pos[1, 2] == 0) and torch.allclose(pos[0, 2], sinusoidal_table(4, 8)[3])
    plain = TransformerEncoder(8, 2, 1, Dropouts()).embed_positions(x)
    assert torch.allclose(plain[0, 2], sinusoidal_table(4, 8)[3]) and not torch.all(plain[0, 2] == 0)


def _per_head_attention(attn: MultiheadAttention, q_in, kv_in, allowed):
    """The official arithmetic: scaled q times k, additive -inf mask, softmax, times v, per head."""
    d, h = q_in.shape[-1], attn.num_heads
    w, b = attn.in_proj_weight, attn.in_proj_bias
    q = (q_in @ w[:d].T + b[:d]) * (d // h) ** -0.5
    k, v = kv_in @ w[d:2 * d].T + b[d:2 * d], kv_in @ w[2 * d:].T + b[2 * d:]
    split = lambda t: t.view(t.shape[0], t.shape[1], h, d // h).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2)
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ split(v)
    return attn.out_proj(out.transpose(1, 2).reshape(q_in.shape))


def test_fused_attention_equals_per_head_arithmetic_with_causal_cross_mask():
    torch.manual_seed(0)
    enc = TransformerEncoder(8, 2, 1, Dropouts(), causal=True).eval()
    q_in, kv_in = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    key_pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    mask, is_causal = enc._mask(3, 5, key_pad, q_in.device)
    # MulT's future mask for T_q=3, T_k=5: query i sees keys j <= i + 2
    assert mask[0, 0].tolist() == [[True, True, True, False, False], [True, True, True, True, False],
                                   [True] * 5]
    attn = enc.layers[0].self_attn
    ours = attn(q_in, kv_in, mask=mask, causal=is_causal)
    assert torch.allclose(ours, _per_head_attention(attn, q_in, kv_in, mask), atol=1e-5)


def test_no_mask_is_built_for_full_sequences_and_causal_uses_the_kernel():
    enc = TransformerEncoder(8, 2, 1, Dropouts())
    assert enc._mask(4, 4, None, torch.device("cpu")) == (None, False)
    assert enc._mask(4, 6, None, torch.device("cpu")) == (None, False)
    causal = TransformerEncoder(8, 2, 1, Dropouts(), causal=True)
    assert causal._mask(4, 4, None, torch.device("cpu")) == (None, True)
    x = torch.randn(1, 4, 8)
    y = x.clone()
    y[:, -1] += torch.randn(1, 8)
    with torch.no_grad():
        assert torch.allclose(causal.eval()(x)[:, :3], causal(y)[:, :3], atol=1e-6)  # the future is unseen
        assert not torch.allclose(enc.eval()(x)[:, :3], enc(y)[:, :3])


@pytest.mark.parametrize("name", ["casp_late", "cggm_msa", "mplmm_mult"])
def test_padded_steps_do_not_leak(name):
    """Changing padded inputs leaves every sample's prediction unchanged (padded keys are masked)."""
    model = preset(name).eval()
    lengths = {"a": [6, 3, 2], "b": [4, 4, 1], "c": [5, 2, 5]}
    b = tiny_batch(lengths)
    c = tiny_batch(lengths)
    for m, v in lengths.items():
        for i, n in enumerate(v):
            c.x[m][i, n:] = 5.0
    with torch.no_grad():
        assert torch.allclose(model(b).pred, model(c).pred, atol=1e-5)


def test_dropout_sites_and_errors_name_the_config_key():
    model = preset("casp_late", dropouts={"embed": 0.3})
    layer = model.encoders["a"].transformer.layers[0]
    assert model.encoders["a"].transformer.embed_dropout == 0.3  # overridden site
    assert layer.relu_dropout == 0.1 and layer.self_attn.dropout == 0.1  # CASP's defaults kept
    with pytest.raises(ValueError, match=r"model.dropouts: unknown site\(s\) \['emb'\]"):
        preset("casp_late", dropouts={"emb": 0.3})
    with pytest.raises(ValueError, match=r"model.heads=3 must divide the transformer width 8 of 'cggm_msa'"):
        preset("cggm_msa", heads=3)
    with pytest.raises(ValueError, match="needs at least 2 modalities"):
        build_model(TINY, REG, backbone="mplmm_mult", d_model=8, layers=1, heads=2, kernel=1, dropout=0.0,
                    fusion_layers=1, modalities=["a"])


@pytest.mark.parametrize("name", PRESETS)
def test_one_training_step_reaches_every_parameter(name):
    model = preset(name, dropouts={})
    model.train()
    model(tiny_batch()).pred.pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("model,message", [
    ({"backbone": "casp_late", "dropouts": {"emb": 0.1}}, r"model.dropouts: unknown site\(s\) \['emb'\]"),
    ({"backbone": "cggm_msa", "dropouts": {"attn": 1.0}}, r"model.dropouts: dropout 'attn' must be in \[0, 1\)"),
    ({"backbone": "mplmm_mult", "d_model": 30, "heads": 4}, r"model.heads=4 must divide the transformer width 30"),
])
def test_preset_config_errors_stop_before_training(model, message):
    from conftest import SCHEMA, default_config
    from mmrepro.config import ConfigError, load_schema, validate_config

    raw = default_config()
    raw["studies"]["balance"]["per_dataset"] = {"synth": {"model": model}}
    with pytest.raises(ConfigError, match=r"config key studies.balance \(dataset synth\): " + message):
        validate_config(raw, load_schema(SCHEMA))
