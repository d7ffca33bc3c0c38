"""Method registries and the trivial member of every family (transform, hook, adapter, settings),
and that evaluation never shows labels to the predict function."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmrepro.data.loader import Batch, SplitLoader
from mmrepro.data.missing import present_mask
from mmrepro.data.schema import DatasetSchema, ModalitySpec, TaskSpec
from mmrepro.evaluate import predict
from mmrepro.methods import ADAPTERS, HOOKS, SETTINGS, TRANSFORMS, MethodPlan, build, resolve_method
from mmrepro.methods.adapters import SourceOnly
from mmrepro.methods.adapters import TestTimeAdapter as BaseAdapter  # aliased: pytest would try to collect Test*
from mmrepro.methods.hooks import JointTraining, TrainingHook
from mmrepro.methods.registry import Registry
from mmrepro.methods.settings import Complete, Domain, ZeroFill
from mmrepro.methods.transforms import FullFinetune, count_parameters
from mmrepro.models import build_model

REG = TaskSpec("score", "regression", value_range=(-3.0, 3.0))
SCHEMA = DatasetSchema(
    name="tiny",
    modalities=(ModalitySpec("a", length=6, dim=5), ModalitySpec("b", length=4, dim=3),
                ModalitySpec("c", length=3, dim=2)),
    tasks=(REG,),
    splits=("train",),
)


def make_arrays(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {"ids": np.array([f"s{i}" for i in range(n)]),
           "y/score": rng.uniform(-3, 3, size=n).astype(np.float32)}
    for m in SCHEMA.modalities:
        out[f"x/{m.name}"] = rng.standard_normal((n, m.length, m.dim)).astype(np.float32) + 1.0  # no zeros
        out[f"len/{m.name}"] = rng.integers(1, m.length + 1, size=n).astype(np.int64)
    return out


def tiny_model(dropout: float = 0.0, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(SCHEMA, REG, backbone="late", d_model=8, layers=1, heads=2, kernel=1, dropout=dropout,
                       fusion_layers=1)


# ---------------------------------------------------------------------------------------------
# Resolving method names


def test_single_names_get_trivial_members_elsewhere():
    assert resolve_method("joint") == MethodPlan(transform="full_finetune", hook="joint", adapter="source_only")
    assert resolve_method("full_finetune") == MethodPlan("full_finetune", "joint", "source_only")
    assert resolve_method("source_only") == MethodPlan("full_finetune", "joint", "source_only")


def test_combined_names():
    plan = resolve_method("full_finetune+joint")
    assert (plan.transform, plan.hook, plan.adapter) == ("full_finetune", "joint", "source_only")
    assert resolve_method("joint+full_finetune") == plan
    assert resolve_method("source_only+joint+full_finetune") == plan


@pytest.mark.parametrize("method,bad", [("wandr", "wandr"), ("joint+nope", "nope"), ("zero_fill", "zero_fill")])
def test_unknown_method_lists_known_names(method, bad):
    with pytest.raises(KeyError) as ei:
        resolve_method(method)
    msg = str(ei.value)
    assert f"unknown method {bad!r}" in msg
    for known in ("full_finetune", "joint", "source_only"):
        assert repr(known) in msg
    assert "zero_fill" not in msg.split("known:")[1]  # data settings are not methods


def test_two_of_one_family_raises(monkeypatch):
    with pytest.raises(ValueError, match=r"names two training hooks: 'joint' and 'joint'"):
        resolve_method("joint+joint")

    class OtherHook(TrainingHook):
        pass

    monkeypatch.setitem(HOOKS._items, "other_hook", OtherHook)
    assert resolve_method("other_hook").hook == "other_hook"
    assert resolve_method("full_finetune+other_hook") == MethodPlan("full_finetune", "other_hook", "source_only")
    with pytest.raises(ValueError, match=r"'joint\+other_hook' names two training hooks: 'joint' and 'other_hook'"):
        resolve_method("joint+other_hook")


def test_registry_register_get_and_twice():
    reg = Registry("widget", default="plain")

    @reg.register("plain")
    class Plain:
        pass

    assert Plain.name == "plain" and reg.get("plain") is Plain
    assert "plain" in reg and "fancy" not in reg and reg.names() == ["plain"]

    class Again:
        pass

    with pytest.raises(ValueError, match="widget 'plain' is registered twice"):
        reg.register("plain")(Again)
    assert reg.get("plain") is Plain
    with pytest.raises(KeyError, match=r"unknown widget 'fancy'; known: \['plain'\]"):
        reg.get("fancy")


def test_global_registries_refuse_a_second_joint():
    class Impostor(TrainingHook):
        pass

    with pytest.raises(ValueError, match="training hook 'joint' is registered twice"):
        HOOKS.register("joint")(Impostor)
    assert HOOKS.get("joint") is JointTraining
    assert TRANSFORMS.get("full_finetune") is FullFinetune and ADAPTERS.get("source_only") is SourceOnly
    assert SETTINGS.get("complete") is Complete and SETTINGS.get("zero_fill") is ZeroFill
    assert SETTINGS.get("domain") is Domain
    assert (TRANSFORMS.default, HOOKS.default, ADAPTERS.default, SETTINGS.default) == (
        "full_finetune", "joint", "source_only", "complete")


def test_build_with_params_and_context():
    s = build(SETTINGS, "zero_fill", {"rate": 0.25, "protocol": "single"})
    assert isinstance(s, ZeroFill) and (s.rate, s.protocol, s.mask_seed) == (0.25, "single", 0)
    m = tiny_model()
    a = build(ADAPTERS, "source_only", None, model=m)
    assert isinstance(a, SourceOnly) and a.model is m


@pytest.mark.parametrize("registry,name,params,needle", [
    (TRANSFORMS, "full_finetune", {"r": 4}, "model transform 'full_finetune': bad parameters ['r']"),
    (SETTINGS, "zero_fill", {"rate": 0.1, "bogus": 1}, "data setting 'zero_fill': bad parameters ['bogus', 'rate']"),
    (SETTINGS, "zero_fill", {}, "data setting 'zero_fill': bad parameters []"),
    (HOOKS, "joint", {"alpha": 1.0}, "training hook 'joint': bad parameters ['alpha']"),
])
def test_build_bad_parameters_name_the_plugin(registry, name, params, needle):
    with pytest.raises(TypeError) as ei:
        build(registry, name, params)
    assert needle in str(ei.value)


def test_build_unknown_plugin():
    with pytest.raises(KeyError, match="unknown data setting 'sometimes'"):
        build(SETTINGS, "sometimes", {})


# ---------------------------------------------------------------------------------------------
# Transform and hook


def test_full_finetune_unfreezes_everything_and_counts():
    m = tiny_model()
    total = sum(p.numel() for p in m.parameters())
    frozen = 0
    for p in list(m.encoders["a"].parameters()) + list(m.head.out.parameters()):
        p.requires_grad_(False)
        frozen += p.numel()
    assert 0 < frozen < total
    assert count_parameters(m) == (total - frozen, total)
    out = build(TRANSFORMS, "full_finetune").apply(m)
    assert out is m
    assert all(p.requires_grad for p in m.parameters())
    assert count_parameters(m) == (total, total)


def test_joint_hook_changes_nothing():
    hook = build(HOOKS, "joint")
    m = tiny_model()
    hook.setup(m, torch.nn.functional.mse_loss, torch.optim.Adam(m.parameters()))
    loss = torch.tensor(1.25)
    assert hook.loss(m, None, None, loss) is loss
    assert hook.after_backward(m, None, None) is None
    assert hook.on_epoch_end(0, m, None) == {}


# ---------------------------------------------------------------------------------------------
# Data settings


def test_zero_fill_present_rate_and_base():
    n, rate = 20000, 0.3
    s = ZeroFill(rate)
    drawn = s.present("train", np.ones((n, 3), dtype=bool))
    np.testing.assert_array_equal(drawn, present_mask(n, 3, rate, seed=0, split="train"))
    se = np.sqrt(rate * (1 - rate) / n)
    assert abs((~drawn.all(axis=1)).mean() - rate) < 4 * se
    assert drawn.sum(axis=1).min() >= 1
    assert not np.array_equal(drawn, s.present("test", np.ones((n, 3), dtype=bool)))
    assert not np.array_equal(drawn, ZeroFill(rate, mask_seed=1).present("train", np.ones((n, 3), dtype=bool)))
    # a dataset's own missingness is kept: the result is base AND drawn
    base = np.random.default_rng(0).random((n, 3)) > 0.1
    both = s.present("train", base)
    np.testing.assert_array_equal(both, base & drawn)


def test_zero_fill_rate_zero_keeps_base():
    base = np.array([[1, 0, 1], [1, 1, 1]], dtype=bool)
    np.testing.assert_array_equal(ZeroFill(0.0).present("valid", base), base)


@pytest.mark.parametrize("rate", [-0.1, 1.0])
def test_zero_fill_bad_rate(rate):
    with pytest.raises(ValueError, match=r"zero_fill.rate must lie in \[0, 1\)"):
        ZeroFill(rate)


def test_zero_fill_bad_protocol():
    with pytest.raises(ValueError, match="zero_fill.protocol must be one of"):
        ZeroFill(0.2, protocol="pairs")


def test_zero_fill_transform_zeros_exactly_the_absent_modalities():
    g = torch.Generator().manual_seed(0)
    B = 6
    x = {m.name: torch.randn(B, m.length, m.dim, generator=g) + 5.0 for m in SCHEMA.modalities}
    present = torch.tensor([[1, 1, 1], [0, 1, 1], [1, 0, 1], [1, 1, 0], [0, 0, 1], [1, 0, 0]], dtype=torch.bool)
    lengths = {m: torch.full((B,), 2) for m in x}
    b = Batch(x={k: v.clone() for k, v in x.items()}, lengths=lengths, present=present, y=torch.arange(B) * 1.0,
              index=torch.arange(B))
    out = ZeroFill(0.5).transform(b)
    for j, m in enumerate(["a", "b", "c"]):
        for i in range(B):
            if present[i, j]:
                assert torch.equal(out.x[m][i], x[m][i]), (m, i)
            else:
                assert torch.all(out.x[m][i] == 0), (m, i)
    assert torch.equal(out.present, present) and torch.equal(out.y, b.y) and torch.equal(out.index, b.index)
    assert out.lengths is b.lengths
    for m in x:  # the input batch is not modified
        assert torch.equal(b.x[m], x[m])


def test_zero_fill_zeros_absent_volumes_along_the_batch_axis():
    """Volumes (B, C, D, H, W), here with B equal to the last spatial size to catch a wrong axis."""
    g = torch.Generator().manual_seed(0)
    x = {"t1": torch.randn(3, 1, 4, 5, 3, generator=g) + 5.0, "flair": torch.randn(3, 1, 4, 5, 3, generator=g) + 5.0}
    present = torch.tensor([[1, 0], [0, 1], [1, 1]], dtype=torch.bool)
    b = Batch(x={k: v.clone() for k, v in x.items()}, lengths={}, present=present, y=torch.zeros(3, 4, 5, 3),
              index=torch.arange(3))
    out = ZeroFill(0.5).transform(b)
    for j, m in enumerate(["t1", "flair"]):
        for i in range(3):
            expected = x[m][i] if present[i, j] else torch.zeros_like(x[m][i])
            assert torch.equal(out.x[m][i], expected), (m, i)


def test_zero_fill_through_the_loader():
    n = 12
    arrays = make_arrays(n)
    s = ZeroFill(0.5, mask_seed=3)
    mask = s.present("train", np.ones((n, 3), dtype=bool))
    assert 0 < (~mask).sum() < mask.size
    ld = SplitLoader(arrays, SCHEMA, "score", batch_size=5, shuffle=True, seed=1, present=mask, transform=s.transform)
    seen = 0
    for b in ld:
        rows = b.index.numpy()
        np.testing.assert_array_equal(b.present.numpy(), mask[rows])
        for j, m in enumerate(SCHEMA.modality_names):
            zeroed = (b.x[m] == 0).flatten(1).all(1).numpy()
            np.testing.assert_array_equal(zeroed, ~mask[rows, j])
        seen += len(b)
    assert seen == n


def test_complete_and_domain_settings():
    c = build(SETTINGS, "complete")
    base = np.array([[True, False]])
    assert c.split_name("test") == "test" and c.present("test", base) is base
    d = build(SETTINGS, "domain", {"domain": "target_x"})
    assert d.split_name("test") == "test@target_x"
    assert d.split_name("train") == "train" and d.split_name("valid") == "valid"
    src = Domain("source")
    assert [src.split_name(s) for s in ("train", "valid", "test")] == ["train", "valid", "test"]
    b = Batch(x={}, lengths={}, present=torch.ones(1, 0, dtype=torch.bool), y=torch.zeros(1), index=torch.zeros(1))
    assert d.transform(b) is b


# ---------------------------------------------------------------------------------------------
# Test-time adapters and label withholding


def _loader(n=10, shuffle=False, seed=0):
    return SplitLoader(make_arrays(n, seed=seed), SCHEMA, "score", batch_size=4, shuffle=shuffle, seed=seed)


def test_source_only_predicts_in_eval_mode_without_gradients():
    m = tiny_model(dropout=0.5).train()
    b = next(iter(_loader()))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    # dropout 0.5 makes train-mode predictions differ from eval-mode ones
    torch.manual_seed(1)
    train_pred = m(b).pred.detach()
    m.eval()
    with torch.no_grad():
        expected = m(b).pred
    m.train()
    assert not torch.allclose(train_pred, expected)
    adapter = SourceOnly(m)
    assert isinstance(adapter, BaseAdapter)
    pred = adapter.predict(b)
    assert pred.shape == (4,) and not pred.requires_grad and pred.grad_fn is None
    torch.testing.assert_close(pred, expected, rtol=0, atol=0)
    torch.testing.assert_close(adapter.predict(b), expected, rtol=0, atol=0)  # no state carried over
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in m.parameters())


class SpyAdapter(BaseAdapter):
    def __init__(self, model):
        super().__init__(model)
        self.seen_y, self.seen_index = [], []

    def predict(self, batch: Batch) -> torch.Tensor:
        self.seen_y.append(batch.y)
        self.seen_index.append(batch.index.clone())
        return SourceOnly(self.model).predict(batch)


def test_predict_withholds_labels_but_returns_them():
    arrays = make_arrays(10, seed=2)
    ld = SplitLoader(arrays, SCHEMA, "score", batch_size=4, shuffle=True, seed=5)
    spy = SpyAdapter(tiny_model())
    calls = []
    pred, y = predict(spy.predict, ld, on_batch=lambda step, p, t: calls.append((step, p.shape, t.copy())))
    assert spy.seen_y == [None, None, None]
    order = torch.cat(spy.seen_index).numpy()
    assert sorted(order.tolist()) == list(range(10))
    assert pred.shape == (10,) and y.shape == (10,)
    np.testing.assert_array_equal(y, arrays["y/score"][order])
    assert [c[0] for c in calls] == [0, 1, 2] and [c[1] for c in calls] == [(4,), (4,), (2,)]
    np.testing.assert_array_equal(np.concatenate([c[2] for c in calls]), y)
    # predictions are the model's, row for row
    m = spy.model.eval()
    with torch.no_grad():
        direct = torch.cat([m(ld.batch(np.sort(idx.numpy()))).pred for idx in spy.seen_index]).numpy()
    np.testing.assert_allclose(pred, direct, rtol=0, atol=1e-6)


def test_subset_setting_keeps_the_named_modalities_in_dataset_order():
    setting = build(SETTINGS, "subset", {"modalities": ["c", "a"]})
    assert setting.modalities(["a", "b", "c"]) == ["a", "c"]
    with pytest.raises(ValueError, match="not in the dataset"):
        setting.modalities(["a", "b"])
    with pytest.raises(ValueError):
        build(SETTINGS, "subset", {"modalities": []})
