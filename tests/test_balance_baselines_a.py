"""OGM-GE and AGM training hooks: hand-worked coefficient formulas, which gradients they change
and by how much, that neither is a no-op, and that a short training run logs their coefficients."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from mmrepro.data.loader import Batch, SplitLoader
from mmrepro.data.schema import DatasetSchema, ModalitySpec, TaskSpec
from mmrepro.methods import HOOKS
from mmrepro.methods.balance.agm import AGM, agm_coefficients, contribution_outputs, modality_score, shapley_values
from mmrepro.methods.balance.ogm_ge import (OGMGE, discrepancy_ratios, ogm_coefficient, true_confidence,
                                            unimodal_outputs)
from mmrepro.models import build_model
from mmrepro.models.gradients import scale_grad
from mmrepro.train import TrainConfig, fit, task_loss_fn

REG = TaskSpec("score", "regression", value_range=(-3.0, 3.0))
CLS = TaskSpec("label", "classification", num_classes=3)
SCHEMA = DatasetSchema(
    name="tiny2",
    modalities=(ModalitySpec("a", length=6, dim=5), ModalitySpec("b", length=4, dim=3)),
    tasks=(REG, CLS),
    splits=("train", "valid"),
)


def make_arrays(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {"ids": np.array([f"s{i}" for i in range(n)]),
           "y/score": rng.uniform(-3, 3, size=n).astype(np.float32),
           "y/label": rng.integers(0, 3, size=n).astype(np.int64)}
    for m in SCHEMA.modalities:
        out[f"x/{m.name}"] = rng.standard_normal((n, m.length, m.dim)).astype(np.float32) + 1.0
        out[f"len/{m.name}"] = rng.integers(1, m.length + 1, size=n).astype(np.int64)
    return out


def make_batch(task: TaskSpec, n: int = 8, seed: int = 0) -> Batch:
    loader = SplitLoader(make_arrays(n, seed), SCHEMA, task.name, batch_size=n, shuffle=False, seed=0)
    return next(iter(loader))


def tiny_model(task: TaskSpec, seed: int = 0, dropout: float = 0.0):
    torch.manual_seed(seed)
    return build_model(SCHEMA, task, backbone="late", d_model=8, layers=1, heads=2, kernel=1, dropout=dropout,
                       fusion_layers=1)


def grads(model) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def backward_plain(model, batch):
    out = model(batch)
    loss = task_loss_fn(model.task_type)(out.pred, batch.y)
    model.zero_grad(set_to_none=True)
    loss.backward()
    return out


# ---------------------------------------------------------------------------------------------
# OGM-GE


def test_ogm_ratio_and_coefficient_hand_worked():
    assert discrepancy_ratios([3.0, 1.0]) == pytest.approx([3.0, 1 / 3])
    assert discrepancy_ratios([2.0, 1.0, 1.0]) == pytest.approx([2.0, 2 / 3, 2 / 3])  # vs mean of others
    assert discrepancy_ratios([1.0, 2.0, 3.0]) == pytest.approx([1 / 2.5, 2 / 2.0, 3 / 1.5])
    # the dominant modality: 1 - tanh(alpha * rho) (the code); the other one is left alone
    assert ogm_coefficient(3.0, alpha=0.5) == pytest.approx(1 - math.tanh(1.5)) == pytest.approx(0.0948517)
    assert ogm_coefficient(1 / 3, alpha=0.5) == 1.0
    assert ogm_coefficient(1.0, alpha=0.5) == 1.0
    # the spec's reading, 1 - tanh(alpha * (rho - 1))
    assert ogm_coefficient(3.0, alpha=0.5, ratio_offset=1.0) == pytest.approx(1 - math.tanh(1.0))


def test_ogm_confidence_hand_worked():
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(4.0), 0.0]])
    y = torch.tensor([1, 1])
    assert true_confidence(logits, y, "classification").tolist() == pytest.approx([0.75, 0.2])
    pred, target = torch.tensor([0.5, -1.0]), torch.tensor([0.0, 1.0])
    assert true_confidence(pred, target, "regression").tolist() == pytest.approx([math.exp(-0.5), math.exp(-2.0)])


def test_ogm_unimodal_outputs_are_the_weight_split_for_a_linear_head():
    model = tiny_model(CLS)
    last = model.head.mlp[-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)  # head(h) = out(h): a linear layer, as the original's fc_out
    batch = make_batch(CLS)
    fused = model(batch).fused.detach()
    outs = unimodal_outputs(model, batch, fused)
    w, b = model.head.out.weight.detach(), model.head.out.bias.detach()
    d = 8
    assert torch.allclose(outs["a"], fused[:, :d] @ w[:, :d].T + b / 2, atol=1e-6)
    assert torch.allclose(outs["b"], fused[:, d:] @ w[:, d:].T + b / 2, atol=1e-6)
    assert torch.allclose(outs["a"] + outs["b"], model.head(fused), atol=1e-6)


@pytest.mark.parametrize("task", [CLS, REG], ids=["cls", "reg"])
def test_ogm_on_a_joint_transformer_fusion_scores_each_modality_alone(task):
    """CGGM's MSA model fuses all tokens in one transformer: no per-modality block of ``fused`` to
    split (d 42 splits into 3 equal blocks, which must not be used). Each modality's output is the
    model with only that modality's inputs, minus (M-1)/M of the model with none; the dominant one's
    encoder gradient is scaled by 1 - tanh(rho), computed here from those forwards."""
    schema = DatasetSchema(name="tiny3", modalities=(ModalitySpec("text", 5, 6), ModalitySpec("audio", 7, 4),
                                                     ModalitySpec("vision", 4, 3)), tasks=(REG, CLS),
                           splits=("train",))
    rng = np.random.default_rng(1)
    arrays = {"ids": np.array([f"s{i}" for i in range(8)]), "y/score": rng.uniform(-3, 3, 8).astype(np.float32),
              "y/label": rng.integers(0, 3, 8)}
    for m in schema.modalities:
        arrays[f"x/{m.name}"] = rng.standard_normal((8, m.length, m.dim)).astype(np.float32) + 1.0
        arrays[f"len/{m.name}"] = rng.integers(1, m.length + 1, 8)
    batch = next(iter(SplitLoader(arrays, schema, task.name, batch_size=8, shuffle=False, seed=0)))
    torch.manual_seed(0)
    model = build_model(schema, task, backbone="cggm_msa", d_model=42, layers=1, heads=2, kernel=1, dropout=0.0,
                        fusion_layers=1)
    assert model(batch).fused.shape[-1] == 42 and not model.fusion.modality_blocks
    model.eval()   # the hook scores in eval mode; here the plain backward too, so both see the same model
    with torch.no_grad():
        def alone(keep):
            return model(replace(batch, x={m: v if m in keep else torch.zeros_like(v) for m, v in batch.x.items()})).pred

        none = alone(())
        outs = {m: alone({m}) - none * 2 / 3 for m in model.names}
    scores = [float(true_confidence(outs[m], batch.y, task.type).sum()) for m in model.names]
    ratios = dict(zip(model.names, discrepancy_ratios(scores)))
    hook = OGMGE(alpha=1.0, ge=False)
    hook.setup(model, task_loss_fn(task.type), None)
    out = backward_plain(model, batch)
    before = grads(model)
    hook.after_backward(model, batch, out)
    after = grads(model)
    assert hook.last_ratios == pytest.approx(ratios, rel=1e-5)
    dominant = [m for m in model.names if ratios[m] > 1]
    assert dominant and all(hook.last_coeffs[m] == pytest.approx(1 - math.tanh(ratios[m])) for m in dominant)
    for k, g in before.items():
        m = k.split(".")[1] if k.startswith("encoders.") else None
        assert torch.allclose(after[k], hook.last_coeffs.get(m, 1.0) * g, rtol=1e-6, atol=1e-12), k


def _expected_ogm(model, batch, fused, alpha):
    """OGM-GE's coefficients computed here from the formulas, independently of the hook."""
    d = fused.shape[1] // 2
    with torch.no_grad():
        base = model.head(torch.zeros(1, fused.shape[1]))
        scores = {}
        for i, m in enumerate(["a", "b"]):
            kept = torch.zeros_like(fused)
            kept[:, i * d:(i + 1) * d] = fused[:, i * d:(i + 1) * d]
            o = model.head(kept) - base / 2
            if model.task_type == "regression":
                scores[m] = float(torch.exp(-(o.squeeze(-1) - batch.y).abs()).sum())
            else:
                scores[m] = float(o.softmax(-1)[torch.arange(len(batch.y)), batch.y].sum())
    ratio_a = scores["a"] / scores["b"]
    dominant, ratio = ("a", ratio_a) if ratio_a > 1 else ("b", 1 / ratio_a)
    return dominant, 1 - math.tanh(alpha * ratio)


@pytest.mark.parametrize("task", [CLS, REG], ids=["cls", "reg"])
def test_ogm_scales_exactly_the_dominant_encoder(task):
    model, batch = tiny_model(task), make_batch(task)
    hook = OGMGE(alpha=1.0, ge=False)
    hook.setup(model, task_loss_fn(task.type), None)
    out = backward_plain(model, batch)
    before = grads(model)
    dominant, coeff = _expected_ogm(model, batch, out.fused.detach(), alpha=1.0)
    hook.after_backward(model, batch, out)
    after = grads(model)
    assert coeff < 0.25  # 1 - tanh(rho) with rho > 1: the hook must change something
    assert hook.last_coeffs[dominant] == pytest.approx(coeff)
    changed = 0
    for k, g in before.items():
        if k.startswith(f"encoders.{dominant}."):
            assert torch.allclose(after[k], coeff * g, rtol=1e-6, atol=1e-12), k
            changed += int(g.abs().sum() > 0)
        else:
            assert torch.equal(after[k], g), k  # the other encoder, fusion and head untouched
    assert changed > 0


def test_ogm_ge_adds_noise_with_the_gradient_std_to_both_encoders():
    model, batch = tiny_model(CLS), make_batch(CLS)
    hook = OGMGE(alpha=1.0, ge=True)
    hook.setup(model, F.cross_entropy, None)
    out = backward_plain(model, batch)
    before = grads(model)
    dominant, coeff = _expected_ogm(model, batch, out.fused.detach(), alpha=1.0)
    torch.manual_seed(123)
    hook.after_backward(model, batch, out)
    after = grads(model)
    torch.manual_seed(123)  # the same draws, in the hook's order: modalities, then encoder parameters
    for m in model.names:
        k_m = coeff if m == dominant else 1.0
        for name, p in model.encoders[m].named_parameters():
            g = before[f"encoders.{m}.{name}"]
            noise = torch.randn_like(g) * (g.std() + 1e-8)
            assert torch.allclose(after[f"encoders.{m}.{name}"], k_m * g + noise, rtol=1e-5, atol=1e-7), name
    for k, g in before.items():
        if not k.startswith("encoders."):
            assert torch.equal(after[k], g), k


def test_ogm_only_inside_the_epoch_window_and_logs_means():
    model, batch = tiny_model(CLS), make_batch(CLS)
    hook = OGMGE(alpha=1.0, ge=False, modulation_starts=2, modulation_ends=2)
    hook.setup(model, F.cross_entropy, None)
    out = backward_plain(model, batch)
    before = grads(model)
    hook.after_backward(model, batch, out)  # epoch 1: outside the window
    assert all(torch.equal(grads(model)[k], g) for k, g in before.items())
    logged = hook.on_epoch_end(1, model, None)
    assert logged["coeff_a"] == logged["coeff_b"] == 1.0
    assert max(logged["ratio_a"], logged["ratio_b"]) == pytest.approx(logged["ratio"]) and logged["ratio"] > 1
    hook.after_backward(model, batch, out)  # epoch 2: inside
    logged = hook.on_epoch_end(2, model, None)
    assert min(logged["coeff_a"], logged["coeff_b"]) < 1 and max(logged["coeff_a"], logged["coeff_b"]) == 1
    assert hook.epoch == 3 and not hook.active


# ---------------------------------------------------------------------------------------------
# AGM


def test_shapley_values_hand_worked():
    v2 = {frozenset(): 0.0, frozenset("a"): 1.0, frozenset("b"): 2.0, frozenset("ab"): 5.0}
    phi = shapley_values(lambda s: torch.tensor(v2[s]), ["a", "b"])
    # phi_a = ((1 - 0) + (5 - 2)) / 2, phi_b = ((2 - 0) + (5 - 1)) / 2
    assert (float(phi["a"]), float(phi["b"])) == pytest.approx((2.0, 3.0))

    # additive parts plus a bonus of 6 when a and b are both present: the bonus splits between them
    def v3(s):
        return torch.tensor(sum({"a": 1.0, "b": 2.0, "c": 4.0}[m] for m in s) + (6.0 if {"a", "b"} <= s else 0.0))

    phi = shapley_values(v3, ["a", "b", "c"])
    assert [float(phi[m]) for m in "abc"] == pytest.approx([4.0, 5.0, 4.0])


def test_sampled_shapley_keeps_efficiency_beyond_the_exact_limit():
    names = list("abcde")
    w = dict(zip(names, [1.0, 2.0, 3.0, 4.0, 5.0]))

    def value(s):
        return torch.tensor(sum(w[m] for m in s) ** 2)

    torch.manual_seed(0)
    phi = shapley_values(value, names, max_exact=4, permutations=5)
    assert sum(float(p) for p in phi.values()) == pytest.approx(float(value(frozenset(names))))
    exact = shapley_values(value, names, max_exact=5)
    # for (sum w)^2 the Shapley value is w_m * sum(w): exact over all 32 subsets
    assert [float(exact[m]) for m in names] == pytest.approx([w[m] * 15.0 for m in names])


def test_agm_coefficients_hand_worked():
    ratios, coeffs = agm_coefficients({"a": 0.5, "b": 1.0}, {"a": 0.8, "b": 0.9}, alpha=1.0)
    assert ratios["a"] == pytest.approx(math.exp(0.5)) and ratios["b"] == pytest.approx(math.exp(-0.5))
    # a leads now (ratio e^0.5) more than on average (eta_a = e^0.1): damped; b boosted
    assert coeffs["a"] == pytest.approx(math.exp(math.exp(0.1) - math.exp(0.5))) == pytest.approx(0.5807, abs=1e-4)
    assert coeffs["b"] == pytest.approx(math.exp(math.exp(-0.1) - math.exp(-0.5))) == pytest.approx(1.3476, abs=1e-4)
    # exponent capped at 10 (a modality far behind its historical ratio)
    _, coeffs = agm_coefficients({"a": 5.0, "b": 0.0}, {"a": 0.0, "b": 3.0}, alpha=0.5)
    assert coeffs["a"] == pytest.approx(math.exp(0.5 * 10))
    # three modalities: each against the mean of the others
    ratios, _ = agm_coefficients({"a": 1.0, "b": 2.0, "c": 3.0}, {"a": 0.0, "b": 0.0, "c": 0.0}, alpha=1.0)
    assert [ratios[m] for m in "abc"] == pytest.approx([math.exp(1.5), 1.0, math.exp(-1.5)])


def test_agm_scores_hand_worked():
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, -100.0]])
    y = torch.tensor([1, 1])  # p = 0.75, then below 1e-8: floored
    assert modality_score(logits, y, "classification") == pytest.approx((-math.log(0.75) - math.log(1e-8)) / 2)
    assert modality_score(torch.tensor([1.0, -1.0]), torch.tensor([0.0, 1.0]), "regression") == pytest.approx(1.5)


def test_agm_contributions_are_the_original_two_modality_split():
    model, batch = tiny_model(CLS, dropout=0.2), make_batch(CLS)
    model.train()
    torch.manual_seed(0)
    full = model(batch).pred
    contribs = contribution_outputs(model, batch, full)
    assert model.training and model.encoders["a"].training  # modes restored
    model.eval()
    with torch.no_grad():
        zero = {m: torch.zeros_like(x) for m, x in batch.x.items()}
        only_a = model(replace(batch, x={"a": batch.x["a"], "b": zero["b"]})).pred
        only_b = model(replace(batch, x={"a": zero["a"], "b": batch.x["b"]})).pred
    assert torch.allclose(contribs["a"], 0.5 * (full - only_b + only_a), atol=1e-6)
    assert torch.allclose(contribs["b"], 0.5 * (full - only_a + only_b), atol=1e-6)
    assert torch.allclose(contribs["a"] + contribs["b"], full, atol=1e-6)


def test_scale_grad_is_identity_forward_and_scales_backward():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    y = scale_grad(x, 0.25)
    assert torch.equal(y, x)
    (3 * y).sum().backward()
    assert x.grad.tolist() == [0.75, 0.75]


@pytest.mark.parametrize("task", [CLS, REG], ids=["cls", "reg"])
def test_agm_gradient_is_the_coefficient_weighted_sum_over_modalities(task):
    model, batch = tiny_model(task), make_batch(task)
    loss_fn = task_loss_fn(task.type)
    hook = AGM(alpha=1.0)
    hook.setup(model, loss_fn, None)
    hook.running = {"a": 0.3, "b": 1.7}  # a history far from today's balance: coefficients != 1
    out = model(batch)
    loss = hook.loss(model, batch, out, loss_fn(out.pred, batch.y))
    assert loss.item() == pytest.approx(loss_fn(out.pred, batch.y).item(), rel=1e-5)
    model.zero_grad(set_to_none=True)
    loss.backward()
    got = grads(model)
    coeffs = hook.last_coeffs
    assert abs(coeffs["a"] - 1) > 0.05 and abs(coeffs["b"] - 1) > 0.05
    # expected: sum_m coeff_m * J(out_m)^T dL/dpred, with out_m the original's two-modality split
    params = [p for p in model.parameters()]
    out = model(batch)
    pred = out.pred.detach().requires_grad_()
    g = torch.autograd.grad(loss_fn(pred, batch.y), pred)[0]
    model.eval()
    zero = {m: torch.zeros_like(x) for m, x in batch.x.items()}
    only_a = model(replace(batch, x={"a": batch.x["a"], "b": zero["b"]})).pred
    only_b = model(replace(batch, x={"a": zero["a"], "b": batch.x["b"]})).pred
    model.train()
    out_a = 0.5 * (out.pred - only_b + only_a)
    out_b = 0.5 * (out.pred - only_a + only_b)
    total = (coeffs["a"] * (out_a * g).sum() + coeffs["b"] * (out_b * g).sum())
    expected = torch.autograd.grad(total, params, allow_unused=True)
    for (k, p), e in zip(model.named_parameters(), expected):
        if e is None:
            assert k not in got or torch.count_nonzero(got[k]) == 0, k
            continue
        assert torch.allclose(got[k], e, rtol=1e-4, atol=1e-7), k
    # and it is not the plain gradient
    backward_plain(model, batch)
    plain = grads(model)
    assert any(not torch.allclose(got[k], plain[k], rtol=1e-3, atol=1e-6) for k in plain)


def test_agm_with_unit_coefficients_is_plain_training_and_tracks_running_scores():
    model, batch = tiny_model(CLS), make_batch(CLS)
    hook = AGM(alpha=0.0)  # every coefficient exp(0) = 1
    hook.setup(model, F.cross_entropy, None)
    out = model(batch)
    loss = hook.loss(model, batch, out, F.cross_entropy(out.pred, batch.y))
    model.zero_grad(set_to_none=True)
    loss.backward()
    got = grads(model)
    backward_plain(model, batch)
    for k, g in grads(model).items():
        assert torch.allclose(got[k], g, rtol=1e-4, atol=1e-7), k
    first = dict(hook.last_scores)
    assert hook.running == pytest.approx(first)  # s_hat after step 1 is s_1
    out = model(batch)
    hook.loss(model, batch, out, F.cross_entropy(out.pred, batch.y))
    assert hook.running == pytest.approx({m: (first[m] + hook.last_scores[m]) / 2 for m in first})


def test_agm_outside_the_window_returns_the_task_loss_and_logs():
    model, batch = tiny_model(CLS), make_batch(CLS)
    hook = AGM(alpha=1.0, modulation_starts=2, modulation_ends=3)
    hook.setup(model, F.cross_entropy, None)
    out = model(batch)
    task_loss = F.cross_entropy(out.pred, batch.y)
    assert hook.loss(model, batch, out, task_loss) is task_loss
    logged = hook.on_epoch_end(1, model, None)
    assert logged["coeff_a"] == logged["coeff_b"] == 1.0
    assert logged["contrib_a"] == pytest.approx(hook.last_scores["a"])
    assert hook.active


# ---------------------------------------------------------------------------------------------
# Registry and a short training run


@pytest.mark.parametrize("name,cls", [("ogm_ge", OGMGE), ("agm", AGM)])
def test_registered(name, cls):
    assert HOOKS.get(name) is cls


@pytest.mark.parametrize("task", [CLS, REG], ids=["cls", "reg"])
@pytest.mark.parametrize("make_hook,keys", [
    (lambda: OGMGE(alpha=0.5), ["coeff_a", "coeff_b", "ratio"]),
    (lambda: AGM(alpha=1.0), ["coeff_a", "coeff_b", "contrib_a", "contrib_b"]),
], ids=["ogm_ge", "agm"])
def test_fit_logs_coefficients(task, make_hook, keys):
    torch.manual_seed(0)
    loaders = [SplitLoader(make_arrays(n, seed), SCHEMA, task.name, batch_size=16, shuffle=s == "train", seed=0)
               for s, n, seed in (("train", 48, 1), ("valid", 16, 2))]
    model = tiny_model(task)
    result = fit(model, *loaders, make_hook(), TrainConfig(epochs=2, batch_size=16, lr=1e-3, device="cpu"))
    assert len(result.history) == 2
    for row in result.history:
        for k in keys:
            assert k in row and math.isfinite(row[k]), (k, row)
