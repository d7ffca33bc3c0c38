"""CGGM hook and the unimodal probes: hand-worked coefficient / direction-loss arithmetic, exact
gradient modulation, gradient isolation between probes and model, the direction term's timing,
and a short end-to-end fit."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mmrepro.data.loader import SplitLoader
from mmrepro.data.schema import DatasetSchema, ModalitySpec, TaskSpec
from mmrepro.methods.balance.cggm import (CGGM, direction_loss, extreme_denominator, head_blocks,
                                         modulation_coefficients)
from mmrepro.methods.balance.probes import UnimodalClassifier, UnimodalProbes, batch_accuracy, sinusoidal_positions
from mmrepro.methods.hooks import JointTraining
from mmrepro.methods.registry import HOOKS, build
from mmrepro.models import build_model
from mmrepro.train import TrainConfig, fit, task_loss_fn

REG = TaskSpec("score", "regression", value_range=(-3.0, 3.0))
CLS = TaskSpec("label", "classification", num_classes=3)
SCHEMA = DatasetSchema(name="tiny2",
                       modalities=(ModalitySpec("a", length=6, dim=5), ModalitySpec("b", length=4, dim=3)),
                       tasks=(REG, CLS), splits=("train", "valid"))
TASKS = {"score": REG, "label": CLS}


def arrays(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {"ids": np.array([f"s{i}" for i in range(n)])}
    for m in SCHEMA.modalities:
        out[f"x/{m.name}"] = rng.standard_normal((n, m.length, m.dim)).astype(np.float32)
        out[f"len/{m.name}"] = rng.integers(1, m.length + 1, size=n).astype(np.int64)
    signal = out["x/a"][:, 0, 0] + 0.5 * out["x/b"][:, 0, 0]  # both modalities carry the label
    out["y/score"] = np.clip(2 * signal, -3, 3).astype(np.float32)
    out["y/label"] = np.digitize(signal, [-0.5, 0.5]).astype(np.int64)
    return out


def loader(task: str = "score", n: int = 32, batch_size: int = 16, seed: int = 0, shuffle: bool = True):
    return SplitLoader(arrays(n, seed), SCHEMA, task, batch_size=batch_size, shuffle=shuffle, seed=seed)


def tiny_model(task: str = "score", seed: int = 0):
    torch.manual_seed(seed)
    return build_model(SCHEMA, TASKS[task], backbone="late", d_model=8, layers=1, heads=2, kernel=1, dropout=0.0,
                       fusion_layers=1)


def batches(task: str = "score", k: int = 2):
    it = iter(loader(task, n=16 * k, shuffle=False))
    return [next(it) for _ in range(k)]


def grads(model) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}


def set_up(task: str = "score", **kw):
    model = tiny_model(task)
    loss_fn = task_loss_fn(model.task_type)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    hook = CGGM(cls_dropout=0.0, **kw)
    hook.setup(model, loss_fn, optimizer)
    return model, loss_fn, optimizer, hook


def one_step(model, loss_fn, optimizer, hook, batch, *, step: bool = True):
    """The shared loop's step (without clipping), returning the loss that was back-propagated."""
    out = model(batch)
    task = loss_fn(out.pred, batch.y)
    loss = hook.loss(model, batch, out, task)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    hook.after_backward(model, batch, out)
    if step:
        optimizer.step()
    return task, loss


# ---------------------------------------------------------------------------------------------
# Hand-worked arithmetic


def test_coefficients_hand_worked():
    # d = [0.1, 0.3, -0.1]: S = 0.3 (+1e-8); coeff = (S - d_i) / S = [0.2/0.3, 0/0.3, 0.4/0.3]
    c = modulation_coefficients([0.1, 0.3, -0.1])
    assert c == pytest.approx([2 / 3, 0.0, 4 / 3], abs=1e-6)
    # no improvement anywhere: S = 1e-8, every coefficient (1e-8 - 0) / 1e-8 = 1
    assert modulation_coefficients([0.0, 0.0]) == pytest.approx([1.0, 1.0])
    # negative sum: d = [-0.2, 0.1], S = -0.1: coeff = [(-0.1+0.2)/-0.1, (-0.1-0.1)/-0.1] = [-1, 2]
    assert modulation_coefficients([-0.2, 0.1]) == pytest.approx([-1.0, 2.0], abs=1e-6)
    # the coefficients always sum to M - 1 (sum_i (S - d_i) / S = (M S - sum d) / S)
    assert sum(modulation_coefficients([0.05, 0.2, 0.1, -0.3])) == pytest.approx(3.0, abs=1e-5)


def test_coefficients_explode_faithfully_and_guarded_variant_clamps():
    # d = [0.1, -0.1]: S = 1e-8, coeff = [(1e-8 - 0.1)/1e-8, (1e-8 + 0.1)/1e-8] = [1 - 1e7, 1 + 1e7]
    c = modulation_coefficients([0.1, -0.1])
    assert c[0] == pytest.approx(1 - 1e7, rel=1e-6) and c[1] == pytest.approx(1 + 1e7, rel=1e-6)
    # guarded, guard_eps 0.05: S -> 0.05, coeff = [(0.05-0.1)/0.05, (0.05+0.1)/0.05] = [-1, 3]
    assert modulation_coefficients([0.1, -0.1], guarded=True) == pytest.approx([-1.0, 3.0], abs=1e-6)
    # guarded with a small negative sum keeps its sign: d = [-0.03, 0.01], S = -0.02 -> -0.05:
    # coeff = [(-0.05+0.03)/-0.05, (-0.05-0.01)/-0.05] = [0.4, 1.2]
    assert modulation_coefficients([-0.03, 0.01], guarded=True) == pytest.approx([0.4, 1.2], abs=1e-6)
    # a sum already larger than guard_eps is untouched
    assert modulation_coefficients([0.1, 0.3, -0.1], guarded=True) == pytest.approx([2 / 3, 0.0, 4 / 3], abs=1e-6)
    assert modulation_coefficients([0.0, 0.0], guarded=True) == pytest.approx([1.0, 1.0])


def test_direction_loss_hand_worked():
    # coeff = [2/3, 0, 4/3], cos = [1, 0.5, -0.5]: sum|c| = 2, sum c*cos = 2/3 + 0 - 2/3 = 0 -> l_gm = 2/3
    l_gm = direction_loss([2 / 3, 0.0, 4 / 3], [torch.tensor(1.0), torch.tensor(0.5), torch.tensor(-0.5)])
    assert float(l_gm) == pytest.approx(2 / 3)
    # fully aligned with non-negative coefficients: l_gm = 0; anti-aligned: 2 * sum|c| / M
    assert float(direction_loss([0.5, 1.5], [torch.tensor(1.0), torch.tensor(1.0)])) == pytest.approx(0.0)
    assert float(direction_loss([0.5, 1.5], [torch.tensor(-1.0), torch.tensor(-1.0)])) == pytest.approx(2.0)
    # any M: four modalities, coeff 1, cos 0 -> (4 - 0) / 4
    assert float(direction_loss([1.0] * 4, [torch.tensor(0.0)] * 4)) == pytest.approx(1.0)


def test_batch_accuracy_sign_agreement_and_argmax():
    # regression: (pred > 0) == (y > 0), zero counted as negative (the official train_eval_senti)
    assert int(batch_accuracy(torch.tensor([0.5, -0.2, 0.0, 1.0]), torch.tensor([1.0, 0.0, -1.0, -2.0]),
                              "regression")) == 3
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0], [0.0, 1.0, 0.0]])
    assert int(batch_accuracy(logits, torch.tensor([0, 2, 0]), "classification")) == 2


def test_head_blocks_slice_the_fused_vector_per_modality():
    model = tiny_model()
    w = model.head.out.weight
    assert w.shape == (1, 16)  # late fusion: concat of two 8-wide blocks
    blocks = head_blocks(model, w)
    assert torch.equal(blocks["a"], w[:, :8]) and torch.equal(blocks["b"], w[:, 8:])
    with pytest.raises(ValueError, match="expected d=8"):
        head_blocks(model, torch.zeros(1, 12))


def test_double_hidden_quirk_changes_the_forward():
    torch.manual_seed(0)
    faithful = UnimodalClassifier(8, 3, layers=1, heads=2, dropout=0.0, faithful_double_hidden=True).eval()
    single = copy.deepcopy(faithful)
    single.faithful_double_hidden = False
    x, lengths = torch.randn(4, 5, 8), torch.tensor([5, 3, 1, 2])
    with torch.no_grad():
        h = faithful.norm(faithful.transformer(faithful.scale * x + sinusoidal_positions(5, 8),
                                               src_key_padding_mask=torch.arange(5)[None] >= lengths[:, None]))[:, 0]
        assert torch.allclose(faithful(x, lengths), faithful.out(torch.relu(faithful.hidden(faithful.hidden(h)))),
                              atol=1e-6)
        assert torch.allclose(single(x, lengths), single.out(torch.relu(single.hidden(h))), atol=1e-6)
        assert not torch.allclose(faithful(x, lengths), single(x, lengths))


# ---------------------------------------------------------------------------------------------
# Gradient isolation and modulation on a two-modality toy model


def test_probes_send_no_gradient_into_the_model():
    model = tiny_model()
    probes = UnimodalProbes.for_model(model, layers=1)
    assert probes.out_weight("a").shape == (1, 8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = batches()[0]
    acc = probes.step(model(batch), batch, task_loss_fn("regression"))
    assert set(acc) == {"a", "b"} and all(0.0 <= v <= 1.0 for v in acc.values())
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.grad is not None for p in probes.parameters() if p.requires_grad)


def test_model_loss_sends_no_gradient_into_the_probes():
    model, loss_fn, optimizer, hook = set_up()
    b1, b2 = batches()
    one_step(model, loss_fn, optimizer, hook, b1)
    assert hook.l_gm is not None
    hook.probes.optimizer.zero_grad(set_to_none=True)
    out = model(b2)
    loss = hook.loss(model, b2, out, loss_fn(out.pred, b2.y))
    loss.backward()  # the task loss plus lam * l_gm
    assert all(p.grad is None for p in hook.probes.parameters())


def test_after_backward_scales_exactly_the_encoder_gradients_except_proj():
    model, loss_fn, optimizer, hook = set_up(rho=1.3)
    batch = batches()[0]
    out = model(batch)
    loss = hook.loss(model, batch, out, loss_fn(out.pred, batch.y))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    before = grads(model)
    hook.after_backward(model, batch, out)
    after = grads(model)
    acc = hook.last_acc
    # first step: the previous accuracies are 0, so d_i = acc_i
    expected = modulation_coefficients([acc["a"], acc["b"]])
    assert [hook.last_coeffs["a"], hook.last_coeffs["b"]] == pytest.approx(expected)
    scaled = 0
    for name, g in after.items():
        parts = name.split(".")
        if parts[0] == "encoders" and parts[2] != "proj":
            factor = hook.last_coeffs[parts[1]] * 1.3
            assert torch.allclose(g, before[name] * factor, rtol=1e-6, atol=0), name
            scaled += 1
        else:  # proj, fusion and head gradients untouched
            assert torch.equal(g, before[name]), name
    assert scaled > 0
    # the hook is not a no-op: some encoder gradient changed
    assert any(not torch.equal(after[n], before[n]) for n in after if n.startswith("encoders.") and ".proj." not in n)


def test_direction_term_absent_at_first_step_then_adds_gradient_to_head_out_weight_only():
    model, loss_fn, optimizer, hook = set_up(lam=0.2)
    b1, b2 = batches()
    task, loss = one_step(model, loss_fn, optimizer, hook, b1)
    assert loss is task  # no direction term at the first step
    assert hook.l_gm is not None and hook.l_gm.requires_grad

    out = model(b2)
    task2 = loss_fn(out.pred, b2.y)
    loss2 = hook.loss(model, b2, out, task2)
    assert loss2 is not task2
    params = dict(model.named_parameters())
    g_full = torch.autograd.grad(loss2, list(params.values()), retain_graph=True, allow_unused=True)
    g_task = torch.autograd.grad(task2, list(params.values()), allow_unused=True)
    diffs = {n: (gf - gt) for n, gf, gt in zip(params, g_full, g_task) if gf is not None}
    assert torch.count_nonzero(diffs["head.out.weight"]) > 0
    assert all(torch.count_nonzero(v) == 0 for n, v in diffs.items() if n != "head.out.weight")
    assert float((loss2 - task2).detach()) == pytest.approx(0.2 * hook.last_l_gm, rel=1e-5)


def test_direction_gradient_matches_the_formula_at_the_previous_head_weight():
    model, loss_fn, optimizer, hook = set_up(lam=0.5)
    b1, b2 = batches()
    probe_w = {m: hook.probes.out_weight(m).detach().clone() for m in ("a", "b")}  # before their update
    w_then = model.head.out.weight.detach().clone()
    one_step(model, loss_fn, optimizer, hook, b1)  # the optimizer step changes the head weight in place
    assert not torch.equal(model.head.out.weight.detach(), w_then)
    c = [hook.last_coeffs["a"], hook.last_coeffs["b"]]
    w = w_then.clone().requires_grad_()
    cos = [torch.nn.functional.cosine_similarity(probe_w["a"].flatten(), w[:, :8].flatten(), dim=0),
           torch.nn.functional.cosine_similarity(probe_w["b"].flatten(), w[:, 8:].flatten(), dim=0)]
    expected_l = (abs(c[0]) + abs(c[1]) - c[0] * cos[0] - c[1] * cos[1]) / 2
    expected_g, = torch.autograd.grad(0.5 * expected_l, w)
    assert hook.last_l_gm == pytest.approx(float(expected_l.detach()), rel=1e-5)

    out = model(b2)
    task2 = loss_fn(out.pred, b2.y)
    loss2 = hook.loss(model, b2, out, task2)
    g_full, = torch.autograd.grad(loss2, model.head.out.weight, retain_graph=True)
    g_task, = torch.autograd.grad(task2, model.head.out.weight)
    assert torch.allclose(g_full - g_task, expected_g, atol=1e-6)


def test_gradient_direction_reading_is_second_order_and_reaches_the_encoders():
    model, loss_fn, optimizer, hook = set_up(direction="gradients", lam=1.0)
    b1, b2 = batches()
    task, loss = one_step(model, loss_fn, optimizer, hook, b1)
    assert loss is task and hook.probe_grads is not None
    out = model(b2)
    task2 = loss_fn(out.pred, b2.y)
    loss2 = hook.loss(model, b2, out, task2)
    assert loss2 is not task2 and np.isfinite(hook.last_l_gm)
    p = model.encoders["a"].transformer.layers[0].linear1.weight
    g_full, = torch.autograd.grad(loss2, p, retain_graph=True)
    g_task, = torch.autograd.grad(task2, p)
    assert not torch.allclose(g_full, g_task)


def test_improvement_is_against_the_previous_batch():
    model, loss_fn, optimizer, hook = set_up()
    accs = []
    for batch in batches(k=3):
        one_step(model, loss_fn, optimizer, hook, batch)
        accs.append(dict(hook.last_acc))
        prev = accs[-2] if len(accs) > 1 else {"a": 0.0, "b": 0.0}
        d = [accs[-1][m] - prev[m] for m in ("a", "b")]
        assert [hook.last_coeffs["a"], hook.last_coeffs["b"]] == pytest.approx(modulation_coefficients(d))
    assert hook.prev_acc == accs[-1]


def test_extreme_steps_are_counted_with_medians_per_epoch_and_totals_per_run():
    assert extreme_denominator([0.1, -0.1]) and extreme_denominator([0.02, 0.0])
    assert not extreme_denominator([0.1, 0.0]) and not extreme_denominator([-0.04, -0.02])
    model, loss_fn, optimizer, hook = set_up()
    hook.probes.evaluate = lambda model, loader: {m: 0.5 for m in hook.names}  # no validation loader here
    # batch accuracies chosen so that the second step of each epoch has d = (0.25, -0.25), S = 1e-8
    accs = iter([{"a": 0.5, "b": 0.5}, {"a": 0.75, "b": 0.25}, {"a": 0.75, "b": 0.5}] * 2)
    hook.probes.step = lambda out, batch, loss_fn: next(accs)
    coeffs = {"a": [], "b": []}
    for epoch in (1, 2):
        for batch in batches(k=3):
            one_step(model, loss_fn, optimizer, hook, batch)
            for m in coeffs:
                coeffs[m].append(hook.last_coeffs[m])
        values = hook.on_epoch_end(epoch, model, None)
        assert (values["coeff_extreme_steps"], values["coeff_extreme_share"]) == (1.0, pytest.approx(1 / 3))
        assert values["coeff_a"] < -1e5  # the mean is dominated by the exploded step, the median is not
        for m in ("a", "b"):
            assert values[f"coeff_median_{m}"] == pytest.approx(float(np.median(coeffs[m][-3:])))
            assert abs(values[f"coeff_median_{m}"]) < 10
    assert hook.run_summary() == {"coeff_steps": 6, "coeff_extreme_steps": 2, "coeff_extreme_share": pytest.approx(1 / 3)}


def test_direction_only_leaves_the_encoder_gradients_alone():
    model, loss_fn, optimizer, hook = set_up(magnitude=False)
    batch = batches(k=1)[0]
    one_step(model, loss_fn, optimizer, hook, batch, step=False)  # first step: no direction term yet
    with_hook = grads(model)
    model.zero_grad(set_to_none=True)
    loss_fn(model(batch).pred, batch.y).backward()
    for name, g in grads(model).items():
        torch.testing.assert_close(with_hook[name], g)
    assert hook.lam > 0 and hook.l_gm is not None  # the direction term still comes at the next step


def test_cggm_training_differs_from_joint_training():
    trained = {}
    for name, hook in (("joint", JointTraining()), ("cggm", CGGM(cls_dropout=0.0))):
        model = tiny_model()
        loss_fn = task_loss_fn(model.task_type)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        hook.setup(model, loss_fn, optimizer)
        for batch in batches(k=3):
            one_step(model, loss_fn, optimizer, hook, batch)
        trained[name] = model.state_dict()
    enc = [k for k in trained["joint"] if k.startswith("encoders.") and ".proj." not in k]
    assert any(not torch.allclose(trained["joint"][k], trained["cggm"][k]) for k in enc)


def test_constructor_validation_and_registry():
    assert HOOKS.get("cggm") is CGGM
    hook = build(HOOKS, "cggm", {"rho": 1.0, "lam": 0.05, "guarded": True})
    assert (hook.rho, hook.lam, hook.guarded) == (1.0, 0.05, True)
    with pytest.raises(ValueError, match="direction"):
        CGGM(direction="sideways")
    one = build_model(DatasetSchema("one", (ModalitySpec("a", 6, 5),), (REG,), ("train",)), REG, backbone="late",
                      d_model=8, layers=1, heads=2, kernel=1, dropout=0.0, fusion_layers=1)
    with pytest.raises(ValueError, match="two modalities"):
        CGGM().setup(one, task_loss_fn("regression"), torch.optim.Adam(one.parameters()))


# ---------------------------------------------------------------------------------------------
# End to end


@pytest.mark.parametrize("task", ["score", "label"])
def test_fit_runs_and_logs_utilisation_and_coefficients(task):
    model = tiny_model(task)
    train, valid = loader(task, n=48, seed=0), loader(task, n=32, seed=1, shuffle=False)
    hook = CGGM(cls_dropout=0.0, guarded=True)
    logged = []
    result = fit(model, train, valid, hook, TrainConfig(epochs=2, batch_size=16, lr=1e-3, clip=0.8, device="cpu"),
                 log_epoch=lambda e, v: logged.append(v))
    assert result.epochs_run == 2 and len(logged) == 2
    for values in logged:
        for m in ("a", "b"):
            assert 0.0 <= values[f"util_{m}"] <= 1.0
            assert np.isfinite(values[f"coeff_{m}"])
            assert 0.0 <= values[f"probe_train_acc_{m}"] <= 1.0
        assert np.isfinite(values["l_gm"])


def test_probe_evaluation_restores_modes_and_sends_no_gradient():
    model = tiny_model("label")
    probes = UnimodalProbes.for_model(model, layers=1)
    model.train()
    acc = probes.evaluate(model, loader("label", n=20, batch_size=8, shuffle=False))
    assert set(acc) == {"a", "b"} and all(0.0 <= v <= 1.0 for v in acc.values())
    assert model.training and probes.training
    model.eval()
    probes.evaluate(model, loader("label", n=8, batch_size=8))
    assert not model.training
    assert all(p.grad is None for p in model.parameters()) and all(p.grad is None for p in probes.parameters())
