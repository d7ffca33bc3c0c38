"""CGGM on the 3-D segmentation model (BraTS): per-modality decoder probes on the detached encoder
pyramids, batch-Dice utilisation, hand-worked coefficients, the direction term and the magnitude
switch against hand computations, and a train_job on a converted BraTS store."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from test_segmentation import brats_spec, brats_store, make_batch, volume_schema  # noqa: F401 (fixture)

from mmrepro.jobs import train_job
from mmrepro.methods.balance.cggm import CGGM, SegmentationProbes, direction_loss, seg_batch_dice
from mmrepro.methods.hooks import JointTraining
from mmrepro.methods.registry import HOOKS, build
from mmrepro.models.segmentation import SegmentationModel, check_method_support, unet3d
from mmrepro.tracking import init_store
from mmrepro.train import segmentation_loss
from mmrepro.spec import MethodPlan

NAMES = ["flair", "t2"]
SHAPE = (12, 12, 12)


def tiny_model(seed: int = 0, k: int = 4) -> SegmentationModel:
    torch.manual_seed(seed)
    schema = volume_schema(NAMES, SHAPE, k=k)
    return unet3d(schema, schema.task("seg"), d_model=8, layers=1, dropout=0.0, levels=3)  # widths 8, 8, 8


def batches(k: int = 2):
    return [make_batch(NAMES, SHAPE, b=2, seed=s) for s in range(k)]


def grads(model) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}


def set_up(optim: str = "adam", **kw):
    model = tiny_model()
    optimizer = (torch.optim.SGD(model.parameters(), lr=0.1) if optim == "sgd"
                 else torch.optim.Adam(model.parameters(), lr=1e-3))
    hook = CGGM(**kw)
    hook.setup(model, segmentation_loss, optimizer)
    return model, optimizer, hook


def backward(model, optimizer, hook, batch):
    out = model(batch)
    task = segmentation_loss(out.pred, batch.y)
    loss = hook.loss(model, batch, out, task)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    return out, task, loss


def one_step(model, optimizer, hook, batch):
    out, task, loss = backward(model, optimizer, hook, batch)
    hook.after_backward(model, batch, out)
    optimizer.step()
    return task, loss


# ---------------------------------------------------------------------------------------------
# Utilisation: the official train_eval_seg, per case


def test_seg_batch_dice_hand_worked():
    eps = 1e-3
    # case 0 (4 voxels): truth [0, 3, 3, 1], pred [0, 3, 1, 1]
    #   ET {3}: pred {1}, truth {1, 2}: (2*1 + 2e) / (1 + 2 + 2e); TC {1,3} and WT {1,2,3}: {1,2,3} both -> 1
    # case 1: truth [2, 2, 0, 0], pred [0, 2, 0, 3]
    #   ET: pred {3}, truth {}: (0 + 2e) / (1 + 0 + 2e); TC: the same;
    #   WT: pred {1, 3}, truth {0, 1}: (2 + 2e) / (4 + 2e)
    y = torch.tensor([[0, 3, 3, 1], [2, 2, 0, 0]])
    pred = torch.tensor([[0, 3, 1, 1], [0, 2, 0, 3]])
    logits = F.one_hot(pred, 4).movedim(-1, 1).float()
    et = ((2 + 2 * eps) / (3 + 2 * eps) + 2 * eps / (1 + 2 * eps)) / 2
    tc = (1.0 + 2 * eps / (1 + 2 * eps)) / 2
    wt = (1.0 + (2 + 2 * eps) / (4 + 2 * eps)) / 2
    assert seg_batch_dice(logits, y) == pytest.approx((et + tc + wt) / 3, rel=1e-6)
    # a region empty in truth and prediction scores 1, as the official epsilon makes it
    assert seg_batch_dice(F.one_hot(torch.zeros(1, 5, dtype=torch.long), 4).movedim(-1, 1).float(),
                          torch.zeros(1, 5, dtype=torch.long)) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# Probes: isolation from the model, inputs = encoder m's level maps


def test_probes_read_encoder_levels_and_send_no_gradient_into_the_model():
    model = tiny_model()
    probes = SegmentationProbes.for_model(model, lr=1e-3)
    assert probes.out_weight("flair").shape == model.head.weight.shape == (4, 8, 1, 1, 1)
    b1, b2 = batches()
    size = tuple(b1.y.shape[1:])
    with torch.no_grad():  # independent reading: each encoder run on its own input (eval mode: not captured)
        model.eval()
        expected = {m: probes.probes[m](model.encoders[m](b1.x[m]), size) for m in NAMES}
    model.train()
    out = model(b1)
    with torch.no_grad():
        got = probes(out, b1)
    for m in NAMES:
        assert got[m].shape == (2, 4, *SHAPE)
        torch.testing.assert_close(got[m], expected[m])
    assert not torch.allclose(got["flair"], got["t2"])  # each probe reads its own modality

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    acc = probes.step(out, b1, segmentation_loss)
    assert set(acc) == set(NAMES) and all(0.0 <= v <= 1.0 for v in acc.values())
    assert acc["flair"] == pytest.approx(seg_batch_dice(expected["flair"], b1.y))  # Dice before the update
    assert all(p.grad is None for p in model.parameters())  # the probes' loss reached no model parameter
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in probes.parameters())

    # a stale output (not the last training forward) is refused rather than silently mismatched
    out1, _ = model(b1), model(b2)
    with pytest.raises(RuntimeError, match="no level maps"):
        probes.step(out1, b1, segmentation_loss)


def test_without_seg_magnitude_after_backward_leaves_every_model_gradient_untouched():
    model, optimizer, hook = set_up(rho=1.3)  # seg_magnitude defaults to False: the official BraTS trainer
    assert hook.seg_magnitude is False
    batch = batches(1)[0]
    out, _, _ = backward(model, optimizer, hook, batch)
    before = grads(model)
    hook.after_backward(model, batch, out)
    assert all(torch.equal(g, before[n]) for n, g in grads(model).items())
    # ... although the coefficients would have scaled them, and the direction term was built
    assert any(abs(hook.last_coeffs[m] * 1.3 - 1.0) > 1e-3 for m in NAMES)
    assert hook.l_gm is not None and hook.l_gm.requires_grad


def test_seg_magnitude_scales_encoder_m_by_hand_worked_coefficients():
    model, optimizer, hook = set_up(rho=1.3, seg_magnitude=True)
    real_step = hook.probes.step
    fixed = iter([{"flair": 0.5, "t2": 0.2}, {"flair": 0.6, "t2": 0.6}])
    hook.probes.step = lambda out, batch, loss_fn: (real_step(out, batch, loss_fn), next(fixed))[1]
    hook.prev_acc = {"flair": 0.3, "t2": 0.3}
    # step 1: d = [0.2, -0.1], S = 0.1: coeff = [(0.1 - 0.2) / 0.1, (0.1 + 0.1) / 0.1] = [-1, 2]
    # step 2: d = [0.6 - 0.5, 0.6 - 0.2] = [0.1, 0.4], S = 0.5: coeff = [0.4 / 0.5, 0.1 / 0.5] = [0.8, 0.2]
    for batch, coeff in zip(batches(), ({"flair": -1.0, "t2": 2.0}, {"flair": 0.8, "t2": 0.2})):
        out, _, _ = backward(model, optimizer, hook, batch)
        before = grads(model)
        hook.after_backward(model, batch, out)
        assert hook.last_coeffs == pytest.approx(coeff, rel=1e-6)
        scaled = 0
        for name, g in grads(model).items():
            parts = name.split(".")
            if parts[0] == "encoders":
                torch.testing.assert_close(g, before[name] * (coeff[parts[1]] * 1.3), rtol=1e-5, atol=1e-12)
                assert not torch.equal(g, before[name]), name
                scaled += 1
            else:  # fusion, decoder and head untouched
                assert torch.equal(g, before[name]), name
        assert scaled == sum(1 for _ in model.encoders.parameters())
        optimizer.step()
    assert hook.prev_acc == {"flair": 0.6, "t2": 0.6}


def test_magnitude_switch_changes_training_and_classifiers_alone_do_not():
    """SGD (Adam would undo a positive gradient scale). Without magnitude and with lam = 0 the probes
    must leave training bit-identical to joint training; the magnitude switch must change it."""
    trained = {}
    for name, hook in (("joint", JointTraining()), ("off", CGGM(lam=0.0)),
                       ("on", CGGM(lam=0.0, seg_magnitude=True, rho=1.3))):
        model = tiny_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        hook.setup(model, segmentation_loss, optimizer)
        for batch in batches():
            one_step(model, optimizer, hook, batch)
        trained[name] = model.state_dict()
    assert all(torch.equal(trained["joint"][k], trained["off"][k]) for k in trained["joint"])
    enc = [k for k in trained["joint"] if k.startswith("encoders.")]
    assert any(not torch.allclose(trained["joint"][k], trained["on"][k]) for k in enc)


# ---------------------------------------------------------------------------------------------
# Direction term


def test_direction_term_matches_hand_computation_and_reaches_only_the_head_weight():
    model, optimizer, hook = set_up(lam=0.5)
    b1, b2 = batches()
    probe_w = {m: hook.probes.out_weight(m).detach().clone() for m in NAMES}  # before their update
    w_then = model.head.weight.detach().clone()
    task1, loss1 = one_step(model, optimizer, hook, b1)
    assert loss1 is task1  # no direction term at the first step
    assert not torch.equal(model.head.weight.detach(), w_then)  # the step moved the head in place
    c = [hook.last_coeffs[m] for m in NAMES]
    w = w_then.clone().requires_grad_()
    cos = [F.cosine_similarity(probe_w[m].flatten(), w.flatten(), dim=0) for m in NAMES]  # whole tensors
    expected_l = (abs(c[0]) + abs(c[1]) - c[0] * cos[0] - c[1] * cos[1]) / 2
    expected_g, = torch.autograd.grad(0.5 * expected_l, w)
    assert hook.last_l_gm == pytest.approx(float(expected_l.detach()), rel=1e-5)

    out = model(b2)
    task2 = segmentation_loss(out.pred, b2.y)
    loss2 = hook.loss(model, b2, out, task2)
    assert float((loss2 - task2).detach()) == pytest.approx(0.5 * hook.last_l_gm, rel=1e-5)
    params = dict(model.named_parameters())
    g_full = torch.autograd.grad(loss2, list(params.values()), retain_graph=True, allow_unused=True)
    g_task = torch.autograd.grad(task2, list(params.values()), allow_unused=True)
    diffs = {n: gf - gt for n, gf, gt in zip(params, g_full, g_task) if gf is not None}
    torch.testing.assert_close(diffs["head.weight"], expected_g, rtol=1e-4, atol=1e-7)
    assert torch.count_nonzero(diffs["head.weight"]) > 0
    assert all(torch.count_nonzero(v) == 0 for n, v in diffs.items() if n != "head.weight")  # encoders included


def test_gradient_direction_reaches_the_encoders_as_computed_by_hand():
    model, optimizer, hook = set_up(direction="gradients", lam=1.0)
    b1, b2 = batches()
    task1, loss1 = one_step(model, optimizer, hook, b1)
    assert loss1 is task1
    probe_g = {m: hook.probes.out_weight(m).grad.detach().clone() for m in NAMES}
    c = [hook.last_coeffs[m] for m in NAMES]

    out = model(b2)
    task2 = segmentation_loss(out.pred, b2.y)
    fused, = torch.autograd.grad(task2, model.head.weight, create_graph=True, retain_graph=True)
    expected_l = direction_loss(c, [F.cosine_similarity(probe_g[m].flatten(), fused.flatten(), dim=0)
                                    for m in NAMES])
    loss2 = hook.loss(model, b2, out, task2)
    assert hook.last_l_gm == pytest.approx(float(expected_l.detach()), rel=1e-5)
    for m in NAMES:
        p = model.encoders[m].stages[0][0][0].weight  # first convolution
        expected, = torch.autograd.grad(expected_l, p, retain_graph=True)
        g_full, = torch.autograd.grad(loss2, p, retain_graph=True)
        g_task, = torch.autograd.grad(task2, p, retain_graph=True)
        assert torch.count_nonzero(expected) > 0
        torch.testing.assert_close(g_full - g_task, expected, rtol=1e-3, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Construction, support, end to end


def test_construction_support_and_optimizer():
    task = volume_schema(NAMES, SHAPE).task("seg")
    check_method_support(task, MethodPlan("full_finetune", "cggm", "source_only"))
    hook = build(HOOKS, "cggm", {"cls_optim": "SGD", "cls_lr": 6e-3, "cls_momentum": 0.9,
                                 "cls_weight_decay": 3e-4, "rho": 1.0, "lam": 0.1, "seg_magnitude": True})
    model = tiny_model()
    hook.setup(model, segmentation_loss, torch.optim.SGD(model.parameters(), lr=0.01))
    assert isinstance(hook.probes, SegmentationProbes) and hook.magnitude
    group = hook.probes.optimizer.param_groups[0]
    assert isinstance(hook.probes.optimizer, torch.optim.SGD)
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (6e-3, 0.9, 3e-4)
    with pytest.raises(ValueError, match="cls_momentum"):
        CGGM(cls_momentum=0.9)  # Adam
    three = tiny_model(k=3)
    with pytest.raises(ValueError, match="4 classes"):
        CGGM().setup(three, segmentation_loss, torch.optim.SGD(three.parameters(), lr=0.01))


def test_train_job_with_cggm_on_a_tiny_brats_store(brats_store, tmp_path):  # noqa: F811
    spec = brats_spec(tmp_path, hook="cggm")
    spec.method_params["cggm"] = {"rho": 1.0, "lam": 0.1, "cls_optim": "SGD", "cls_lr": 6e-3, "cls_momentum": 0.9,
                                  "cls_weight_decay": 3e-4}
    init_store(spec.tracking.uri, ["balance"], tmp_path / "artifacts")
    summary = train_job(spec, brats_store, tmp_path / "run", threads=1)
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written == json.loads(json.dumps(summary)) and written["method"] == spec.method
    assert written["backbone"] == "unet3d"
    for split in ("valid", "test"):
        assert set(written["metrics"][split]) == {"dice_et", "dice_tc", "dice_wt", "dice_mean"}
        assert all(0.0 <= v <= 1.0 for v in written["metrics"][split].values())
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    modalities = ["flair", "t1ce", "t1", "t2"]
    for h in history:
        for m in modalities:
            assert 0.0 <= h[f"util_{m}"] <= 1.0
            assert 0.0 <= h[f"probe_train_acc_{m}"] <= 1.0
            assert math.isfinite(h[f"coeff_{m}"])
        # every step's coefficients sum to M - 1 (= 3), so their epoch means do too
        assert sum(h[f"coeff_{m}"] for m in modalities) == pytest.approx(3.0, abs=1e-3)
        assert math.isfinite(h["l_gm"]) and h["l_gm"] >= 0.0
