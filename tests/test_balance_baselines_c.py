"""MRD, G-Blending, UME, QMF, ReconBoost and UMT: each one's defining behaviour (a no-op would fail),
hand-worked formulas, how their method names resolve, and a short training run of each."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.nn import functional as F

from mmrepro.data.loader import SplitLoader
from mmrepro.methods.balance.gblending import GBlending, blend_weights
from mmrepro.methods.balance.late import LateHeadsModel
from mmrepro.methods.balance.mrd import MRD, drop_modalities
from mmrepro.methods.balance.qmf import QMF, normalise_history, ranking_loss
from mmrepro.methods.balance.reconboost import ReconBoost, boosting_loss
from mmrepro.methods.balance.ume import UME
from mmrepro.methods.balance.umt import UMT
from mmrepro.methods.registry import TRANSFORMS, build, resolve_method
from mmrepro.models import build_model
from mmrepro.train import TrainConfig, fit, task_loss_fn
from test_balance_baselines_a import CLS, REG, SCHEMA, grads, make_arrays, make_batch, tiny_model


def late_model(name: str, task=CLS, seed=0):
    return build(TRANSFORMS, resolve_method(name).transform).apply(tiny_model(task, seed))


def setup_hook(hook, model):
    hook.setup(model, task_loss_fn(model.task_type), torch.optim.SGD(model.parameters(), lr=0.0))
    return hook


def hook_grads(hook, model, batch):
    out = model(batch)
    loss = hook.loss(model, batch, out, task_loss_fn(model.task_type)(out.pred, batch.y))
    model.zero_grad(set_to_none=True)
    loss.backward()
    hook.after_backward(model, batch, out)
    return grads(model), out, loss


def test_method_names_pick_the_transform_their_hook_trains():
    assert resolve_method("ume").transform == "late_mean"
    assert resolve_method("qmf").transform == "late_qmf"
    assert resolve_method("reconboost").transform == "late_boost"
    assert resolve_method("late_qmf+qmf").transform == "late_qmf"
    assert (resolve_method("mrd").transform, resolve_method("mrd").hook) == ("mrd", "joint")
    assert resolve_method("mrd+cggm").hook == "cggm"
    with pytest.raises(ValueError, match="late_qmf"):
        resolve_method("lora+qmf")


# ---------------------------------------------------------------------------------------------
# MRD


def test_mrd_drops_inputs_in_training_only_and_keeps_one_modality():
    batch = make_batch(CLS, n=400)
    torch.manual_seed(0)
    dropped = drop_modalities(batch, p=0.6)
    kept = torch.stack([(v.flatten(1) != 0).any(1) for v in dropped.x.values()], dim=1)
    assert kept.any(1).all()  # never all modalities gone
    assert torch.equal(dropped.present, kept)
    # 0.6 each, minus the rescued all-dropped samples (0.36 of them get one back): 0.6 - 0.36 / 2 = 0.42
    assert abs(float((~kept).float().mean()) - 0.42) < 0.05
    for m, v in dropped.x.items():  # kept inputs unchanged
        torch.testing.assert_close(v[kept[:, list(dropped.x).index(m)]], batch.x[m][kept[:, list(dropped.x).index(m)]])
    model = tiny_model(CLS)
    plain = copy.deepcopy(model).eval()
    MRD(p=0.6).apply(model)
    small = make_batch(CLS, n=8)
    model.eval()
    torch.testing.assert_close(model(small).pred, plain(small).pred)  # evaluation: complete data
    model.train()
    torch.manual_seed(1)
    seen = {}
    model.encoders["a"].register_forward_pre_hook(lambda mod, args: seen.update(x=args[0].clone()))
    model(small)
    assert (seen["x"].flatten(1) == 0).all(1).any()  # some sample's input reached the encoder zeroed


# ---------------------------------------------------------------------------------------------
# G-Blending


def test_gblending_weights_hand_worked():
    prev = {"fused": (1.0, 1.2), "a": (1.0, 1.1), "b": (1.0, 1.0)}
    now = {"fused": (0.6, 1.0), "a": (0.9, 1.0), "b": (0.8, 1.05)}
    # fused: dG 0.2, dO (0.4 - 0.2) = 0.2 -> 5; a: dG 0.1, dO (0.1 - 0.1) = 0 -> 0.1 / eps, huge; b: dG < 0 -> 0
    w = blend_weights(prev, now, eps=1e-2)
    raw = {"fused": 0.2 / (0.04 + 1e-2), "a": 0.1 / (0.0 + 1e-2), "b": 0.0}
    assert w == pytest.approx({k: v / sum(raw.values()) for k, v in raw.items()})
    assert blend_weights(prev, {k: (v[0], v[1] + 1) for k, v in prev.items()}) is None


def test_gblending_trains_unimodal_heads_into_the_encoders_and_holds_out_samples():
    torch.manual_seed(0)
    model = tiny_model(CLS)
    batch = make_batch(CLS, n=20)
    hook = setup_hook(GBlending(holdout_every=4, lr=0.0), model)  # heads stay put between calls
    g, _, _ = hook_grads(hook, model, batch)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in hook.heads.parameters())
    # the unimodal heads' losses reach the encoders: gradients differ from the weighted fused loss alone
    out = model(batch)
    held = batch.index % 4 == 0
    w = hook.weights["fused"]
    model.zero_grad(set_to_none=True)
    (w * F.cross_entropy(out.pred[~held], batch.y[~held])).backward()
    only_fused = grads(model)
    enc = [k for k in g if k.startswith("encoders.a.")]
    assert any(not torch.allclose(g[k], only_fused[k]) for k in enc)
    assert all(torch.allclose(g[k], only_fused[k], atol=1e-7) for k in g if k.startswith(("fusion.", "head.")))
    # held-out samples give no gradient: changing their labels changes nothing
    flipped = copy.copy(batch)
    flipped.y = torch.where(held, (batch.y + 1) % 3, batch.y)
    g2, _, _ = hook_grads(hook, model, flipped)
    for k in g:
        torch.testing.assert_close(g2[k], g[k])


def test_gblending_re_estimates_weights_from_its_snapshots():
    model = tiny_model(CLS)
    hook = setup_hook(GBlending(every=1, holdout_every=2), model)
    keys = ["fused", "a", "b"]
    hook._sums = {k: [1.0, 1.0, 1.2, 1.0] for k in keys}
    logged = hook.on_epoch_end(1, model, None)
    assert logged["gb_w_fused"] == pytest.approx(1 / 3)  # first snapshot: weights unchanged
    hook._sums = {"fused": [0.6, 1.0, 1.0, 1.0], "a": [1.0, 1.0, 1.3, 1.0], "b": [0.95, 1.0, 1.1, 1.0]}
    logged = hook.on_epoch_end(2, model, None)
    expected = blend_weights({k: (1.0, 1.2) for k in keys}, {"fused": (0.6, 1.0), "a": (1.0, 1.3), "b": (0.95, 1.1)})
    assert logged["gb_w_a"] == 0.0 and logged["gb_w_fused"] == pytest.approx(expected["fused"])
    assert hook.weights == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------
# UME


def test_ume_predicts_the_mean_and_trains_each_modality_on_its_own_loss():
    torch.manual_seed(0)
    model = late_model("ume")
    assert isinstance(model, LateHeadsModel) and not hasattr(model, "fusion")
    batch = make_batch(CLS, n=12)
    out = model(batch)
    preds, _ = model.unimodal(out.features)
    torch.testing.assert_close(out.pred, (preds["a"] + preds["b"]) / 2)
    hook = setup_hook(UME(), model)
    g, _, _ = hook_grads(hook, model, batch)
    out = model(batch)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model.unimodal(out.features)[0]["a"], batch.y).backward()
    alone = grads(model)
    for k in alone:  # modality a's parameters see exactly a's own loss
        torch.testing.assert_close(g[k], alone[k])
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(batch).pred, batch.y).backward()  # the ensemble's loss would couple them
    assert any(not torch.allclose(g[k], p.grad) for k, p in model.named_parameters() if k.startswith("encoders.a."))


# ---------------------------------------------------------------------------------------------
# QMF


def test_qmf_ranking_loss_hand_worked():
    conf = torch.tensor([0.5, 0.2, 0.9])
    hist = torch.tensor([0.8, 0.2, 0.2])  # pairs (0,1), (1,2), (2,0)
    # (0,1): t=+1, margin .6: relu(0.5 - 0.2 - 0.6) = 0; (1,2): t=0 -> 0; (2,0): t=-1, margin .6:
    # relu(-(0.9 - (0.5 - 0.6))) = relu(-1.0) = 0. Swap the confidences of 0 and 2 to get a violation:
    assert float(ranking_loss(conf, hist)) == 0.0
    conf2 = torch.tensor([0.9, 0.2, 0.5])
    # (0,1): relu(0.9 - 0.2 - 0.6) = 0.1; (2,0): relu(-(0.5 - (0.9 - 0.6))) = relu(-0.2) = 0
    assert float(ranking_loss(conf2, hist)) == pytest.approx(0.1 / 3)
    assert torch.allclose(normalise_history(torch.tensor([1.0, 3.0]), 1.0, 3.0), torch.tensor([0.0, 1.0]), atol=1e-6)


@pytest.mark.parametrize("task", [CLS, REG])
def test_qmf_fuses_by_confidence_and_ranks_against_history(task):
    torch.manual_seed(0)
    model = late_model("qmf", task)
    batch = make_batch(task, n=10)
    out = model(batch)
    preds, confs = model.unimodal(out.features)
    if task is CLS:
        torch.testing.assert_close(confs["a"], torch.logsumexp(preds["a"], -1) / 10)
        torch.testing.assert_close(out.pred, preds["a"] * confs["a"][:, None] + preds["b"] * confs["b"][:, None])
    else:
        w = torch.stack([confs["a"], confs["b"]]).softmax(0)
        torch.testing.assert_close(out.pred, w[0] * preds["a"] + w[1] * preds["b"])
    hook = setup_hook(QMF(), model)
    loss_fn = task_loss_fn(model.task_type)
    _, _, loss = hook_grads(hook, model, batch)
    for m in model.names:  # history holds each sample's unimodal loss
        torch.testing.assert_close(hook.history[m][batch.index], loss_fn(preds[m], batch.y, reduction="none").detach())
    assert float(loss.detach()) > float(loss_fn(out.pred, batch.y).detach()) + 0.1  # unimodal terms are added
    # the ranking loss sends gradient into the confidences: with only it, the heads still move
    out = model(batch)
    _, confs = model.unimodal(out.features)
    model.zero_grad(set_to_none=True)
    hist = confs["a"].detach().argsort().argsort().float() * 1e-4  # larger past loss where confidence is larger
    torch.testing.assert_close(normalise_history(hist, 0.0, 1.0), hist, rtol=1e-6, atol=1e-9)
    rank = ranking_loss(confs["a"], hist)
    assert float(rank.detach()) > 0
    rank.backward()
    assert model.uni_heads["a"].weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# ReconBoost


def test_reconboost_boosting_loss_hand_worked():
    pred = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    others = torch.tensor([[0.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    y = torch.tensor([0, 1])
    q = others.softmax(-1)[[0, 1], y]
    logp = pred.log_softmax(-1)[[0, 1], y]
    expected = (-(5 - q) * logp / 3).mean()
    torch.testing.assert_close(boosting_loss(pred, others, y, "classification", 5.0, 1.0), expected)
    # a sample the others already get right weighs less
    assert float(5 - q[1]) < float(5 - q[0])
    r = boosting_loss(torch.tensor([1.0]), torch.tensor([0.5]), torch.tensor([0.0]), "regression", 5.0, 1.0)
    assert float(r) == pytest.approx((5 - math.exp(-0.5)) * 1.0)


@pytest.mark.parametrize("task", [CLS, REG])
def test_reconboost_alternates_modalities_and_rectifies(task):
    torch.manual_seed(0)
    model = late_model("reconboost", task)
    batch = make_batch(task, n=10)
    hook = setup_hook(ReconBoost(stage_epochs=1, correct_epochs=1), model)
    names = model.names
    assert [hook.boosted(names) for hook.epoch in range(1, 7)] == ["a", None, "b", None, "a", None]
    hook.epoch = 3  # boosting "b": only b's encoder and head get gradients, on the boosting loss
    g, out, loss = hook_grads(hook, model, batch)
    assert not any(k.startswith(("encoders.a.", "uni_heads.a.")) for k in g)
    assert any(k.startswith("uni_heads.b.") for k in g)
    preds, _ = model.unimodal(out.features)
    torch.testing.assert_close(loss, boosting_loss(preds["b"], preds["a"], batch.y, model.task_type, 5.0, 1.0))
    hook.epoch = 4  # rectification: the ensemble's task loss, every learner
    g, out, loss = hook_grads(hook, model, batch)
    assert any(k.startswith("encoders.a.") for k in g) and any(k.startswith("encoders.b.") for k in g)
    torch.testing.assert_close(loss, task_loss_fn(model.task_type)(out.pred, batch.y))


# ---------------------------------------------------------------------------------------------
# UMT


def teacher(m: str, task=CLS, seed=5):
    torch.manual_seed(seed)
    return build_model(SCHEMA, task, backbone="late", d_model=8, layers=1, heads=2, kernel=1, dropout=0.0,
                       fusion_layers=1, modalities=[m]).eval()


def test_umt_distils_each_encoder_towards_its_teacher():
    model = tiny_model(CLS)
    batch = make_batch(CLS, n=10)
    teachers = {m: teacher(m) for m in model.names}
    hook = setup_hook(UMT(weight=0.5, teachers=teachers), model)
    g, out, loss = hook_grads(hook, model, batch)
    distill = sum(F.mse_loss(out.features[m], teachers[m](batch).features[m]) for m in model.names)
    torch.testing.assert_close(loss, F.cross_entropy(out.pred, batch.y) + 0.5 * distill)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(batch).pred, batch.y).backward()
    assert any(not torch.allclose(g[k], p.grad) for k, p in model.named_parameters() if k.startswith("encoders.b."))
    assert all(p.grad is None for t in teachers.values() for p in t.parameters())
    with pytest.raises(ValueError, match="teacher"):
        setup_hook(UMT(teachers={"a": teachers["a"]}), tiny_model(CLS))


# ---------------------------------------------------------------------------------------------
# A short run of each through the shared loop


@pytest.mark.parametrize("method", ["mrd", "gblending", "ume", "qmf", "reconboost", "umt"])
def test_each_method_trains_in_the_loop(method):
    torch.manual_seed(0)
    plan = resolve_method(method)
    model = build(TRANSFORMS, plan.transform).apply(tiny_model(CLS))
    from mmrepro.methods.registry import HOOKS
    context = {"teachers": {m: teacher(m) for m in SCHEMA.modality_names}} if method == "umt" else {}
    params = {"reconboost": {"stage_epochs": 1, "correct_epochs": 1}, "gblending": {"every": 1}}.get(method, {})
    hook = build(HOOKS, plan.hook, params, **context)
    train = SplitLoader(make_arrays(48, 1), SCHEMA, "label", batch_size=16, shuffle=True, seed=0)
    valid = SplitLoader(make_arrays(16, 2), SCHEMA, "label", batch_size=16, shuffle=False, seed=0)
    before = copy.deepcopy(model.state_dict())
    result = fit(model, train, valid, hook, TrainConfig(epochs=3, batch_size=16, lr=1e-2, patience=10))
    assert result.epochs_run == 3 and all(math.isfinite(h["valid_loss"]) for h in result.history)
    changed = [k for k, v in model.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, before[k])]
    assert any(k.startswith("encoders.") for k in changed)


def grid_config():
    from conftest import REPO, SCHEMA as CONFIG_SCHEMA
    import yaml

    from mmrepro.config import load_schema, merge_config, validate_config

    cfg = merge_config(yaml.safe_load((REPO / "config" / "config.yaml").read_text()),
                       yaml.safe_load((REPO / "config" / "grids" / "balance_synth.yaml").read_text()))
    return validate_config(cfg, load_schema(CONFIG_SCHEMA))


def test_umt_runs_depend_on_the_grids_unimodal_runs():
    from mmrepro.config import ConfigError, load_schema, run_spec, teacher_runs, validate_config
    from conftest import SCHEMA as CONFIG_SCHEMA

    cfg = grid_config()
    runs = teacher_runs(cfg, "balance", "synth", "umt", 3)
    assert {m: (r["method"], r["setting"], r["seed"]) for m, r in runs.items()} == {
        "text": ("joint", "only_text", 3), "audio": ("joint", "only_audio", 3), "vision": ("joint", "only_vision", 3)}
    assert run_spec(cfg, "balance", "synth", "umt", "complete", 3).teachers["audio"] == "only_audio"
    assert teacher_runs(cfg, "balance", "synth", "qmf", 3) == {} and "teachers" not in run_spec(
        cfg, "balance", "synth", "qmf", "complete", 3).to_dict()
    bad = copy.deepcopy(cfg)
    bad["studies"]["balance"]["settings"] = {"complete": {"type": "complete"}}
    with pytest.raises(ConfigError, match="studies.balance.methods.*'umt' distils from unimodal teachers"):
        validate_config(bad, load_schema(CONFIG_SCHEMA))


def test_method_variants_run_a_plug_in_with_other_parameters():
    from mmrepro.config import ConfigError, load_schema, run_spec, validate_config
    from conftest import SCHEMA as CONFIG_SCHEMA

    cfg = grid_config()
    spec = run_spec(cfg, "balance", "synth", "cggm_direction", "complete", 0)
    assert spec.method == "cggm_direction" and spec.plan.hook == "cggm"
    assert spec.method_params["cggm"] == {"lam": 0.1, "magnitude": False}
    assert run_spec(cfg, "balance", "synth", "cggm", "complete", 0).method_params["cggm"] == {}
    for change, key in ((lambda c: c["method_variants"].update(cggm_x={"method": "cggm", "params": {"rhoo": 1}}),
                         "method_variants.cggm_x.params"),
                        (lambda c: c["method_variants"].update(cggm_y={"method": "nope"}), "method_variants.cggm_y.method"),
                        (lambda c: c["method_variants"].update(joint={"method": "cggm"}), "method_variants.joint")):
        bad = copy.deepcopy(cfg)
        change(bad)
        name = key.split(".")[1]
        if name not in ("joint",):
            bad["studies"]["balance"]["methods"].append(name)
        with pytest.raises(ConfigError, match=key):
            validate_config(bad, load_schema(CONFIG_SCHEMA))
