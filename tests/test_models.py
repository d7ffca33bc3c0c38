"""The shared multimodal model: output shapes, padding invariance, empty modalities, gradients."""

from __future__ import annotations

import pytest
import torch

from mmrepro.data.loader import Batch
from mmrepro.data.schema import DatasetSchema, ModalitySpec, TaskSpec
from mmrepro.models import ModelOutput, MultimodalModel, build_model
from mmrepro.models.encoders import attention_mask, masked_mean, padding_mask

REG = TaskSpec("score", "regression", value_range=(-3.0, 3.0))
CLS = TaskSpec("cls", "classification", num_classes=3)
SCHEMA = DatasetSchema(
    name="tiny",
    modalities=(ModalitySpec("a", length=6, dim=5), ModalitySpec("b", length=4, dim=3)),
    tasks=(REG, CLS),
    splits=("train",),
)
D_MODEL = 8
B = 5
BACKBONES = ["late", "mult", "concat"]
FUSED_WIDTH = {"late": 2 * D_MODEL, "mult": 2 * D_MODEL, "concat": D_MODEL}  # concat reads one time step


def model(backbone: str, task: TaskSpec = REG, *, kernel: int = 1, dropout: float = 0.0, seed: int = 0,
          layers: int = 1) -> MultimodalModel:
    torch.manual_seed(seed)
    return build_model(SCHEMA, task, backbone=backbone, d_model=D_MODEL, layers=layers, heads=2, kernel=kernel,
                       dropout=dropout, fusion_layers=1)


def batch(lengths: dict[str, list[int]] | None = None, seed: int = 0, pad_value: float | None = 0.0) -> Batch:
    """Random features; positions at or after each sample's length set to ``pad_value``."""
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or {"a": [6, 3, 1, 5, 2], "b": [4, 2, 3, 1, 4]}
    x = {"a": torch.randn(B, 6, 5, generator=g), "b": torch.randn(B, 4, 3, generator=g)}
    lens = {m: torch.tensor(v, dtype=torch.long) for m, v in lengths.items()}
    if pad_value is not None:
        for m in x:
            for i, L in enumerate(lengths[m]):
                x[m][i, L:] = pad_value
    return Batch(x=x, lengths=lens, present=torch.ones(B, 2, dtype=torch.bool), y=torch.zeros(B),
                 index=torch.arange(B))


def with_padding(b: Batch, value: float) -> Batch:
    x = {m: v.clone() for m, v in b.x.items()}
    for m in x:
        for i, L in enumerate(b.lengths[m].tolist()):
            x[m][i, L:] = value
    return Batch(x=x, lengths=b.lengths, present=b.present, y=b.y, index=b.index)


# ---------------------------------------------------------------------------------------------
# Helpers of the encoder


def test_padding_mask_attention_mask_and_masked_mean():
    pad = padding_mask(torch.tensor([3, 1, 0]), 4)
    assert pad.tolist() == [[False, False, False, True], [False, True, True, True], [True, True, True, True]]
    # attention may look at the first slot of an empty sequence (finite softmax); nothing else changes
    assert attention_mask(pad).tolist() == [[False, False, False, True], [False, True, True, True],
                                            [False, True, True, True]]
    tokens = torch.arange(3 * 4 * 2, dtype=torch.float32).reshape(3, 4, 2)
    mean = masked_mean(tokens, pad)
    torch.testing.assert_close(mean[0], tokens[0, :3].mean(0))
    torch.testing.assert_close(mean[1], tokens[1, 0])
    torch.testing.assert_close(mean[2], torch.zeros(2))


# ---------------------------------------------------------------------------------------------
# Shapes


@pytest.mark.parametrize("backbone", BACKBONES)
def test_regression_output_shapes(backbone):
    out = model(backbone)(batch())
    assert isinstance(out, ModelOutput)
    assert out.pred.shape == (B,)
    assert out.fused.shape == (B, FUSED_WIDTH[backbone])
    assert set(out.tokens) == set(out.features) == {"a", "b"}
    assert out.tokens["a"].shape == (B, 6, D_MODEL) and out.tokens["b"].shape == (B, 4, D_MODEL)
    assert out.features["a"].shape == out.features["b"].shape == (B, D_MODEL)
    # features are the masked means of the tokens; padded tokens are zero
    pad_a = padding_mask(batch().lengths["a"], 6)
    torch.testing.assert_close(out.features["a"], masked_mean(out.tokens["a"], pad_a))
    assert torch.all(out.tokens["a"][1, 3:] == 0) and torch.any(out.tokens["a"][1, :3] != 0)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_classification_output_shapes(backbone):
    out = model(backbone, CLS)(batch())
    assert out.pred.shape == (B, 3)
    assert out.pred.dtype == torch.float32
    assert out.fused.shape == (B, FUSED_WIDTH[backbone])


def test_subset_of_modalities():
    torch.manual_seed(0)
    m = build_model(SCHEMA, REG, backbone="late", d_model=D_MODEL, layers=1, heads=2, kernel=1, dropout=0.0,
                    fusion_layers=1, modalities=["b"])
    assert m.names == ["b"] and list(m.encoders) == ["b"]
    out = m(batch())
    assert out.pred.shape == (B,) and out.fused.shape == (B, D_MODEL) and set(out.tokens) == {"b"}


def test_unknown_backbone_names_known_ones():
    with pytest.raises(ValueError, match=r"unknown backbone 'gru'; known: \['casp_early', 'casp_late', 'cggm_food', 'cggm_msa', 'concat', 'late', "
                       r"'mplmm_mult', 'mult'\]"):
        build_model(SCHEMA, REG, backbone="gru", d_model=D_MODEL, layers=1, heads=2, kernel=1, dropout=0.0,
                    fusion_layers=1)


def test_backbones_differ_in_parameters():
    late, mult = model("late"), model("mult")
    assert any(k.startswith("fusion.cross.a->b") for k, _ in mult.named_parameters())
    assert any(k.startswith("fusion.cross.b->a") for k, _ in mult.named_parameters())
    assert not any(k.startswith("fusion.cross") for k, _ in late.named_parameters())
    concat = model("concat")
    assert concat.fusion.out_dim == D_MODEL and any(k.startswith("fusion.transformer") for k, _ in concat.named_parameters())


def test_concat_fusion_reads_the_first_time_step_after_attending_over_all_modalities():
    fusion = model("concat").fusion.eval()
    tokens = {"a": torch.randn(2, 3, D_MODEL), "b": torch.randn(2, 4, D_MODEL)}
    pads = {"a": torch.zeros(2, 3, dtype=torch.bool), "b": torch.zeros(2, 4, dtype=torch.bool)}
    out = fusion(tokens, pads)
    changed = fusion(tokens, {**pads, "b": torch.ones(2, 4, dtype=torch.bool)})  # hide modality b
    assert out.shape == (2, D_MODEL)
    assert not torch.allclose(out, changed), "the first token attends to the other modality's tokens"


# ---------------------------------------------------------------------------------------------
# Padding and empty modalities


@pytest.mark.parametrize("task", [REG, CLS], ids=["reg", "cls"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_padding_values_do_not_change_prediction(backbone, task):
    m = model(backbone, task, kernel=1, dropout=0.1).eval()
    b0 = batch()
    with torch.no_grad():
        p0 = m(b0).pred
        p1 = m(with_padding(b0, 100.0)).pred
        p2 = m(with_padding(b0, -7.5)).pred
        # sanity: the prediction does react to a valid position
        b3 = with_padding(b0, 0.0)
        b3.x["a"][1, 0] += 3.0
        p3 = m(b3).pred
    torch.testing.assert_close(p1, p0, rtol=0, atol=1e-5)
    torch.testing.assert_close(p2, p0, rtol=0, atol=1e-5)
    assert (p3[1] - p0[1]).abs().max() > 1e-4
    torch.testing.assert_close(p3[[0, 2, 3, 4]], p0[[0, 2, 3, 4]], rtol=0, atol=1e-5)  # samples independent


@pytest.mark.parametrize("backbone", BACKBONES)
def test_padding_values_do_not_change_prediction_with_kernel_3(backbone):
    m = model(backbone, kernel=3).eval()
    b0 = batch()
    with torch.no_grad():
        p0, p1 = m(b0).pred, m(with_padding(b0, 100.0)).pred
    torch.testing.assert_close(p1, p0, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_length_zero_modality_ignores_its_values(backbone):
    m = model(backbone).eval()
    b0 = batch({"a": [6, 3, 1, 5, 2], "b": [0, 2, 3, 1, 4]})
    with torch.no_grad():
        p0, p1 = m(b0).pred, m(with_padding(b0, 5.0)).pred
    torch.testing.assert_close(p1, p0, rtol=0, atol=1e-5)


@pytest.mark.parametrize("task", [REG, CLS], ids=["reg", "cls"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_length_zero_gives_finite_outputs(backbone, task):
    lengths = {"a": [0, 3, 0, 6, 1], "b": [4, 0, 0, 1, 0]}  # sample 2 has no tokens at all
    for mode in ("train", "eval"):
        m = model(backbone, task, dropout=0.1)
        getattr(m, mode)()
        out = m(batch(lengths))
        assert torch.isfinite(out.pred).all(), mode
        assert torch.isfinite(out.fused).all(), mode
        assert all(torch.isfinite(f).all() for f in out.features.values()), mode
    # a whole batch without any token of one modality
    out = model(backbone, task).eval()(batch({"a": [0] * B, "b": [4, 2, 3, 1, 4]}))
    assert torch.isfinite(out.pred).all()


# ---------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("task", [REG, CLS], ids=["reg", "cls"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_gradients_reach_every_parameter(backbone, task):
    m = model(backbone, task, kernel=3).train()
    b = batch({"a": [6, 6, 4, 6, 2], "b": [4, 3, 4, 1, 4]})
    out = m(b)
    if task.type == "regression":
        loss = torch.nn.functional.mse_loss(out.pred, torch.linspace(-1, 1, B))
    else:
        loss = torch.nn.functional.cross_entropy(out.pred, torch.tensor([0, 1, 2, 0, 1]))
    loss.backward()
    params = dict(m.named_parameters())
    assert len(params) > 10
    no_grad = [k for k, p in params.items() if p.grad is None]
    zero_grad = [k for k, p in params.items() if p.grad is not None and not torch.any(p.grad != 0)]
    assert no_grad == [] and zero_grad == []
