"""PMR, MSLR and Greedy hooks: their formulas on hand-worked inputs, their defining effect on loss,
gradients or learning rates (each test would fail for a no-op hook), and short training runs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from mmrepro.data.loader import Batch, SplitLoader
from mmrepro.data.schema import DatasetSchema, ModalitySpec, TaskSpec
from mmrepro.methods import HOOKS, build
from mmrepro.methods.balance.greedy import GreedyRebalancing, grad_weight_ratio
from mmrepro.methods.balance.mslr import (ModalitySpecificLearningRates, only_modality, unimodal_scores,
                                          update_factor)
from mmrepro.methods.balance.pmr import PrototypicalModalRebalance, rebalance_coefficients, sign_classes
from mmrepro.models import ModelOutput, build_model
from mmrepro.train import TrainConfig, fit

REG = TaskSpec("score", "regression", value_range=(-3.0, 3.0))
CLS = TaskSpec("label", "classification", num_classes=3)
SCHEMA = DatasetSchema(
    name="toy2",
    modalities=(ModalitySpec("a", length=4, dim=3), ModalitySpec("b", length=3, dim=2)),
    tasks=(REG, CLS),
    splits=("train", "valid"),
)


def toy_model(task: TaskSpec = REG, backbone: str = "late", seed: int = 0):
    torch.manual_seed(seed)
    return build_model(SCHEMA, task, backbone=backbone, d_model=8, layers=1, heads=2, kernel=1, dropout=0.0,
                       fusion_layers=1)


def toy_batch(n: int = 6, seed: int = 0, task: TaskSpec = REG) -> Batch:
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=g) * 6 - 3) if task.type == "regression" else torch.arange(n) % task.num_classes
    return Batch(x={"a": torch.randn(n, 4, 3, generator=g) + 1.0, "b": torch.randn(n, 3, 2, generator=g) + 1.0},
                 lengths={"a": torch.full((n,), 4), "b": torch.full((n,), 3)},
                 present=torch.ones(n, 2, dtype=torch.bool), y=y, index=torch.arange(n))


def toy_arrays(n: int, seed: int, task: TaskSpec = REG) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {"ids": np.array([f"s{i}" for i in range(n)])}
    xa = rng.standard_normal((n, 4, 3)).astype(np.float32)
    xb = rng.standard_normal((n, 3, 2)).astype(np.float32)
    out["x/a"], out["x/b"] = xa, xb
    out["len/a"], out["len/b"] = np.full(n, 4, np.int64), np.full(n, 3, np.int64)
    signal = xa[:, :, 0].mean(1) + 0.3 * xb[:, :, 0].mean(1)
    out["y/score"] = (2.0 * signal).astype(np.float32)
    out["y/label"] = np.digitize(signal, np.quantile(signal, [1 / 3, 2 / 3])).astype(np.int64)
    return out


def loaders(task: TaskSpec = REG, n_train: int = 32, n_valid: int = 16, batch_size: int = 8):
    tr = SplitLoader(toy_arrays(n_train, 0, task), SCHEMA, task.name, batch_size=batch_size, shuffle=True, seed=0)
    va = SplitLoader(toy_arrays(n_valid, 1, task), SCHEMA, task.name, batch_size=batch_size, shuffle=False, seed=0)
    return tr, va


def fake_out(features: dict[str, torch.Tensor]) -> ModelOutput:
    return ModelOutput(pred=torch.zeros(len(next(iter(features.values())))), fused=torch.zeros(1), tokens={},
                       features=features)


def entropy(p: list[float]) -> float:
    return -sum(q * math.log(q) for q in p)


# ---------------------------------------------------------------------------------------------
# PMR


def test_pmr_sign_classes_and_coefficients():
    assert sign_classes(torch.tensor([-0.5, 0.0, 0.3, -3.0])).tolist() == [0, 1, 1, 0]
    dom, c = rebalance_coefficients({"a": 1.5, "b": 1.0, "c": 0.5})
    assert dom == "a" and c == pytest.approx({"a": 0.0, "b": 0.5, "c": 1.0})  # clip(3 - 1) = 1
    dom, c = rebalance_coefficients({"a": 1.5, "b": 1.0}, "binary")
    assert dom == "a" and c == {"a": 0.0, "b": 1.0}


def test_pmr_prototypes_running_mean_then_ema():
    hook = PrototypicalModalRebalance(momentum=0.2)
    hook.setup(toy_model(), None, None)
    labels = torch.tensor([0, 0, 1])
    hook.accumulate({"a": torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 4.0]]),
                     "b": torch.tensor([[2.0, 2.0], [0.0, 0.0], [1.0, 1.0]])}, labels)
    protos, seen = hook.current_prototypes()  # first epoch: running class means
    assert seen.tolist() == [True, True]
    assert torch.allclose(protos["a"], torch.tensor([[2.0, 0.0], [0.0, 4.0]]))
    hook.on_epoch_end(1, None, None)
    assert torch.allclose(hook.prototypes["b"], torch.tensor([[1.0, 1.0], [1.0, 1.0]]))
    # epoch 2: class 0 only; new mean [6, 0] -> 0.8 * 6 + 0.2 * 2 = 5.2; class 1 keeps its prototype
    hook.accumulate({"a": torch.tensor([[6.0, 0.0]]), "b": torch.tensor([[3.0, 1.0]])}, torch.tensor([0]))
    hook.on_epoch_end(2, None, None)
    assert torch.allclose(hook.prototypes["a"], torch.tensor([[5.2, 0.0], [0.0, 4.0]]))
    assert torch.allclose(hook.prototypes["b"], torch.tensor([[0.8 * 3 + 0.2, 0.8 * 1 + 0.2], [1.0, 1.0]]))


def _pmr_with_prototypes(**kw) -> PrototypicalModalRebalance:
    hook = PrototypicalModalRebalance(**kw)
    hook.setup(toy_model(), None, None)
    hook.prototypes = {"a": torch.tensor([[0.0, 0.0], [2.0, 0.0]]), "b": torch.tensor([[0.0, 0.0], [2.0, 0.0]])}
    hook.seen = torch.tensor([True, True])
    return hook


def test_pmr_loss_hand_worked():
    """a sits on its prototypes (strong), b halfway between them (weak)."""
    hook = _pmr_with_prototypes(alpha=1.0, mu=0.5, temperature=1.0)
    fa = torch.tensor([[0.0, 0.0], [2.0, 0.0]], requires_grad=True)
    fb = torch.tensor([[1.0, 0.0], [1.0, 0.0]], requires_grad=True)
    batch = Batch(x={}, lengths={}, present=torch.ones(2, 2, dtype=torch.bool), y=torch.tensor([-1.0, 2.0]),
                  index=torch.arange(2))
    task = torch.tensor(0.3)
    loss = hook.loss(None, batch, fake_out({"a": fa, "b": fb}), task)
    p_true_a = 1.0 / (1.0 + math.exp(-2.0))  # distances 0 and 2
    score_a, score_b = 2 * p_true_a, 2 * 0.5
    c = min(max(score_a / score_b - 1.0, 0.0), 1.0)
    expected = 0.3 + 1.0 * c * math.log(2.0) - 0.5 * c * entropy([p_true_a, 1 - p_true_a])
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    # PCE pulls each b feature toward its own class prototype (x decreases for class 0, grows for class 1)
    assert fb.grad[0, 0] > 0 and fb.grad[1, 0] < 0
    # entropy bonus pushes a's features away from their own prototype (toward the decision boundary)
    assert fa.grad[0, 0] < 0 and fa.grad[1, 0] > 0
    logged = hook.on_epoch_end(1, None, None)
    assert logged["pmr_coef_b"] == pytest.approx(c) and logged["pmr_coef_a"] == 0.0
    assert logged["pmr_entropy_coef_a"] == pytest.approx(0.5 * c) and logged["pmr_entropy_coef_b"] == 0.0
    assert logged["pmr_score_a"] == pytest.approx(p_true_a, rel=1e-5)


def test_pmr_entropy_only_early_and_modulation_window():
    fa = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    fb = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    batch = Batch(x={}, lengths={}, present=torch.ones(2, 2, dtype=torch.bool), y=torch.tensor([-1.0, 2.0]),
                  index=torch.arange(2))
    p = 1.0 / (1.0 + math.exp(-2.0))
    c = min(2 * p - 1.0, 1.0)
    hook = _pmr_with_prototypes(alpha=2.0, mu=0.5, per_epochs=1, modulation_ends=2)
    hook.epoch = 2  # past the entropy epochs, inside the PCE window
    loss = hook.loss(None, batch, fake_out({"a": fa, "b": fb}), torch.tensor(0.0))
    assert float(loss) == pytest.approx(2.0 * c * math.log(2.0), rel=1e-5)
    hook.epoch = 3  # past modulation_ends: the task loss itself
    task = torch.tensor(0.7)
    assert hook.loss(None, batch, fake_out({"a": fa, "b": fb}), task) is task
    binary = _pmr_with_prototypes(alpha=2.0, mu=0.0, coef="binary")
    assert float(binary.loss(None, batch, fake_out({"a": fa, "b": fb}), torch.tensor(0.0))) == pytest.approx(
        2.0 * math.log(2.0), rel=1e-5)


def test_pmr_changes_weak_encoder_gradients_on_the_model():
    model, batch = toy_model(), toy_batch(8)
    hook = PrototypicalModalRebalance(alpha=1.0, mu=0.0)
    hook.setup(model, None, None)
    with torch.no_grad():
        out = model(batch)
    hook.accumulate(out.features, hook.classes(batch.y))
    hook.on_epoch_end(1, model, None)  # prototypes from this batch
    grads = {}
    for use_hook in (False, True):
        model.zero_grad()
        out = model(batch)
        task = nn.functional.l1_loss(out.pred, batch.y)
        (hook.loss(model, batch, out, task) if use_hook else task).backward()
        grads[use_hook] = {m: torch.cat([p.grad.flatten() for p in model.encoders[m].parameters()])
                           for m in model.names}
    coefs = hook._log
    weak = "a" if coefs["pmr_coef_a"][0] > 0 else "b"
    strong = "b" if weak == "a" else "a"
    assert coefs[f"pmr_coef_{weak}"][0] > 0 and coefs[f"pmr_coef_{strong}"][0] == 0.0
    assert not torch.allclose(grads[True][weak], grads[False][weak])
    torch.testing.assert_close(grads[True][strong], grads[False][strong])  # no term for the dominant one (mu=0)


def test_pmr_classification_uses_head_classes():
    hook = PrototypicalModalRebalance()
    hook.setup(toy_model(CLS), None, None)
    assert hook.num_classes == 3 and hook.classes(torch.tensor([2, 0])).tolist() == [2, 0]


# ---------------------------------------------------------------------------------------------
# MSLR


def test_mslr_rebuilds_param_groups_in_place():
    model = toy_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=0.01, betas=(0.8, 0.9))
    hook = ModalitySpecificLearningRates("keep", lrs={"a": 0.05})
    hook.setup(model, None, opt)
    assert len(opt.param_groups) == 3
    default, ga, gb = opt.param_groups
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(ga["params"]) == ids(model.encoders["a"].parameters()) and ga["lr"] == 0.05
    assert ids(gb["params"]) == ids(model.encoders["b"].parameters()) and gb["lr"] == 1e-3
    enc = ids(model.encoders.parameters())
    assert not (ids(default["params"]) & enc) and default["lr"] == 1e-3
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    assert (ga["weight_decay"], ga["betas"], ga["modality"]) == (0.01, (0.8, 0.9), "a")
    with pytest.raises(ValueError, match="mslr.period: must be >= 2"):
        ModalitySpecificLearningRates("dynamic", period=1)
    with pytest.raises(ValueError, match="does not have"):
        ModalitySpecificLearningRates(lrs={"z": 1.0}).setup(toy_model(), None, torch.optim.Adam(model.parameters()))


def test_mslr_keeps_adam_state_and_resumes():
    model, batch = toy_model(), toy_batch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    nn.functional.l1_loss(model(batch).pred, batch.y).backward()
    opt.step()
    p0 = next(model.encoders["a"].parameters())
    exp_avg = opt.state[p0]["exp_avg"].clone()
    ModalitySpecificLearningRates("keep", lrs={"a": 0.01}).setup(model, None, opt)
    assert torch.equal(opt.state[p0]["exp_avg"], exp_avg) and opt.state[p0]["step"] == 1
    opt.zero_grad()
    nn.functional.l1_loss(model(batch).pred, batch.y).backward()
    opt.step()
    assert opt.state[p0]["step"] == 2
    # a resumed run: fresh optimizer, same hook setup, then the saved state loads into matching groups
    opt2 = torch.optim.Adam(model.parameters(), lr=1e-3)
    ModalitySpecificLearningRates("keep", lrs={"a": 0.01}).setup(model, None, opt2)
    opt2.load_state_dict(opt.state_dict())
    assert [g["lr"] for g in opt2.param_groups] == [1e-3, 0.01, 1e-3]
    assert torch.equal(opt2.state[p0]["exp_avg"], opt.state[p0]["exp_avg"])


def test_mslr_keep_steps_each_encoder_at_its_own_rate():
    """Adam's first step moves every parameter by about lr * sign(grad): the per-modality rates show."""
    model, batch = toy_model(), toy_batch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ModalitySpecificLearningRates("keep", lrs={"a": 0.1, "b": 1e-4}).setup(model, None, opt)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    nn.functional.l1_loss(model(batch).pred, batch.y).backward()
    opt.step()
    step = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters()}
    assert max(v for n, v in step.items() if n.startswith("encoders.a.")) == pytest.approx(0.1, rel=1e-3)
    assert max(v for n, v in step.items() if n.startswith("encoders.b.")) == pytest.approx(1e-4, rel=1e-3)
    assert max(v for n, v in step.items() if n.startswith("head.")) == pytest.approx(1e-3, rel=1e-3)


def test_mslr_update_rules_hand_worked():
    hist = [0.5, 0.6, 0.7, 0.8, 0.9]
    assert update_factor(hist, "keep", 5, 5) == 1.0
    assert update_factor(hist, "dynamic", 5, 5) == pytest.approx(0.9 / 0.7)
    assert update_factor(hist, "dynamic", 4, 5) == 1.0  # only every `period` epochs
    assert update_factor(hist, "smooth", 4, 5) == pytest.approx((0.9 / 0.7) ** 0.2)
    assert update_factor([0.5, 0.0], "dynamic", 2, 2) == 1.0  # a zero score never zeroes a rate
    model = toy_model()
    hook = ModalitySpecificLearningRates("dynamic", lrs={"a": 0.01, "b": 0.02}, period=2)
    hook.setup(model, None, torch.optim.Adam(model.parameters(), lr=1e-3))
    hook.apply_scores(1, {"a": 0.4, "b": 0.8})
    assert (hook.lr("a"), hook.lr("b")) == (0.01, 0.02)
    hook.apply_scores(2, {"a": 0.6, "b": 0.4})  # a: 0.6 / 0.5; b: 0.4 / 0.6
    assert hook.lr("a") == pytest.approx(0.012) and hook.lr("b") == pytest.approx(0.02 * 0.4 / 0.6)
    smooth = ModalitySpecificLearningRates("smooth", lrs={"a": 0.01}, period=2)
    smooth.setup(model := toy_model(), None, torch.optim.Adam(model.parameters(), lr=1e-3))
    smooth.apply_scores(1, {"a": 0.4, "b": 0.8})
    smooth.apply_scores(2, {"a": 0.6, "b": 0.8})
    assert smooth.lr("a") == pytest.approx(0.01 * (0.6 / 0.5) ** 0.5)


def test_mslr_unimodal_scores_zero_the_other_modalities():
    batch = toy_batch()
    only_a = only_modality(batch, "a")
    assert torch.equal(only_a.x["a"], batch.x["a"]) and not only_a.x["b"].any()
    assert only_a.present[:, 0].all() and not only_a.present[:, 1].any()
    assert torch.equal(only_a.lengths["b"], batch.lengths["b"]) and batch.x["b"].any()  # original untouched
    model = toy_model()
    _, valid = loaders()
    scores = unimodal_scores(model, valid)
    model.eval()
    with torch.no_grad():
        err = sum(float((model(only_modality(b, "b")).pred - b.y).abs().sum()) for b in valid)
    assert scores["b"] == pytest.approx(16 / err, rel=1e-5)
    assert model.training is False
    cls_model = toy_model(CLS)
    _, cls_valid = loaders(CLS)
    acc = unimodal_scores(cls_model, cls_valid)
    assert set(acc) == {"a", "b"} and all(0.0 <= v <= 1.0 for v in acc.values())


# ---------------------------------------------------------------------------------------------
# Greedy


class TwoLinear(nn.Module):
    """Two one-layer 'encoders' with hand-set weights (no bias), enough for the speed bookkeeping."""

    def __init__(self):
        super().__init__()
        self.names = ["a", "b"]
        self.encoders = nn.ModuleDict({"a": nn.Linear(2, 1, bias=False), "b": nn.Linear(2, 1, bias=False)})
        self.fusion = nn.Identity()
        with torch.no_grad():
            self.encoders["a"].weight.copy_(torch.tensor([[1.0, 2.0]]))  # ||w||^2 = 5
            self.encoders["b"].weight.copy_(torch.tensor([[2.0, 0.0]]))  # ||w||^2 = 4

    def set_grads(self):
        self.encoders["a"].weight.grad = torch.tensor([[0.1, 0.2]])  # ||g||^2 = 0.05 -> ratio 0.01
        self.encoders["b"].weight.grad = torch.tensor([[0.02, 0.0]])  # ||g||^2 = 4e-4 -> ratio 1e-4


def test_greedy_speed_is_accumulated_grad_to_weight_ratio():
    m = TwoLinear()
    m.set_grads()
    assert grad_weight_ratio(m.encoders["a"].parameters()) == pytest.approx(0.01)
    hook = GreedyRebalancing(epsilon=0.5, window=2, start_epoch=2)
    hook.setup(m, None, None)
    hook.after_backward(m, None, None)
    m.set_grads()
    hook.after_backward(m, None, None)
    assert hook.main == pytest.approx({"a": 0.02, "b": 2e-4})
    assert hook.imbalance == pytest.approx(2.0)  # log10(0.02 / 2e-4)
    assert hook.caring is None  # epoch 1: measured, never re-balanced
    logged = hook.on_epoch_end(1, m, None)
    assert logged["greedy_speed_a"] == pytest.approx(math.log10(0.02))
    assert logged["greedy_rebalance_a"] == logged["greedy_rebalance_b"] == 0.0 and logged["greedy_rebalanced"] == -1.0


def test_greedy_rebalancing_window_drops_other_encoder_gradients():
    m = TwoLinear()
    hook = GreedyRebalancing(epsilon=0.5, window=2, start_epoch=2)
    hook.setup(m, None, None)
    hook.epoch = 2
    m.set_grads()
    hook.after_backward(m, None, None)  # normal step: d = 2 > 0.5 -> the next 2 steps care for b
    assert hook.caring == "b" and m.encoders["a"].weight.grad is not None
    for _ in range(2):
        m.set_grads()
        hook.after_backward(m, None, None)
        assert m.encoders["a"].weight.grad is None
        torch.testing.assert_close(m.encoders["b"].weight.grad, torch.tensor([[0.02, 0.0]]))
    assert hook.main == pytest.approx({"a": 0.01, "b": 1e-4})  # not accumulated while re-balancing
    m.set_grads()
    hook.after_backward(m, None, None)  # window over: a normal step again (and a new window starts)
    assert m.encoders["a"].weight.grad is not None and hook.caring == "b"
    logged = hook.on_epoch_end(2, m, None)
    assert logged["greedy_rebalance_b"] == pytest.approx(2 / 4) and logged["greedy_rebalanced"] == 1.0
    balanced = GreedyRebalancing(epsilon=5.0, window=2, start_epoch=1)
    balanced.setup(m, None, None)
    m.set_grads()
    balanced.after_backward(m, None, None)
    assert balanced.caring is None  # imbalance below epsilon: no re-balancing


def test_greedy_rebalancing_freezes_other_encoder_under_adam():
    model, batch = toy_model(), toy_batch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    hook = GreedyRebalancing(epsilon=0.0, window=3, start_epoch=1)
    hook.setup(model, None, opt)

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(batch)
        nn.functional.l1_loss(out.pred, batch.y).backward()
        hook.after_backward(model, batch, out)
        opt.step()

    step()  # normal step with momentum built up in every encoder; decides a window
    slow = hook.caring
    assert slow in ("a", "b")
    fast = "b" if slow == "a" else "a"
    before = {k: [p.detach().clone() for p in model.encoders[k].parameters()] for k in ("a", "b")}
    step()  # re-balancing step
    assert all(torch.equal(p, q) for p, q in zip(model.encoders[fast].parameters(), before[fast]))
    assert not all(torch.equal(p, q) for p, q in zip(model.encoders[slow].parameters(), before[slow]))


def test_greedy_conditional_speed_needs_crossmodal_backbone():
    with pytest.raises(ValueError, match="mult"):
        GreedyRebalancing(speed="conditional").setup(toy_model(), None, None)
    model, batch = toy_model(backbone="mult"), toy_batch()
    hook = GreedyRebalancing(speed="conditional", start_epoch=1, epsilon=0.0)
    hook.setup(model, None, None)
    out = model(batch)
    nn.functional.l1_loss(out.pred, batch.y).backward()
    bdr = {}
    for k in ("a", "b"):
        src = "b" if k == "a" else "a"
        bdr[k] = math.log10(grad_weight_ratio(model.fusion.cross[f"{src}->{k}"].parameters())
                            / grad_weight_ratio(model.encoders[k].parameters()))
    hook.after_backward(model, batch, out)
    assert hook.speeds() == pytest.approx(bdr)
    assert hook.imbalance == pytest.approx(abs(bdr["a"] - bdr["b"]))
    assert hook.caring == max(bdr, key=bdr.get)  # the modality leaning more on the other


# ---------------------------------------------------------------------------------------------
# Registry and short training runs


@pytest.mark.parametrize("name,params,task,keys", [
    ("pmr", {"alpha": 1.0, "mu": 0.1}, REG, ["pmr_coef_a", "pmr_coef_b", "pmr_entropy_coef_a", "pmr_score_b"]),
    ("pmr", {}, CLS, ["pmr_coef_a", "pmr_score_a"]),
    ("mslr", {"variant": "dynamic", "lrs": {"a": 2e-3}, "period": 2}, REG, ["lr_a", "lr_b", "mslr_score_a"]),
    ("greedy", {"start_epoch": 1, "window": 2}, REG,
     ["greedy_speed_a", "greedy_speed_b", "greedy_imbalance", "greedy_rebalance_a", "greedy_rebalanced"]),
])
def test_fit_logs_method_values(name, params, task, keys):
    hook = build(HOOKS, name, params)
    assert HOOKS.get(name) is type(hook)
    train, valid = loaders(task)
    logged = []
    result = fit(toy_model(task), train, valid, hook, TrainConfig(epochs=2, batch_size=8, lr=1e-3, device="cpu"),
                 log_epoch=lambda e, v: logged.append((e, v)))
    assert [e for e, _ in logged] == [1, 2] and result.epochs_run == 2
    for _, values in logged:
        assert set(keys) <= set(values)
        assert all(isinstance(v, float) for v in values.values())
    if name == "mslr":  # the dynamic rates moved with the unimodal scores
        assert logged[1][1]["lr_a"] != 2e-3 or logged[1][1]["lr_b"] != 1e-3
