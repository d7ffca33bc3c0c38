"""The missing-modality protocol (data setting ``missing``/``available``) and the baselines that
need no backbone internals (modality substitution, modality dropout, lower bound)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmrepro.data.loader import SplitLoader
from mmrepro.data.missing import case_masks, incomplete_patterns, present_mask
from mmrepro.data.schema import DatasetSchema, ModalitySpec, TaskSpec
from mmrepro.evaluate import case_average
from mmrepro.methods import SETTINGS, TRANSFORMS, build
from mmrepro.models import build_model

REG = TaskSpec("score", "regression", value_range=(-3.0, 3.0))
SCHEMA = DatasetSchema(name="tiny", modalities=(ModalitySpec("a", length=6, dim=5), ModalitySpec("b", length=4, dim=3),
                                                ModalitySpec("c", length=3, dim=2)), tasks=(REG,), splits=("train",))
NAMES = SCHEMA.modality_names


def arrays(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {"ids": np.array([f"s{i}" for i in range(n)]), "y/score": rng.uniform(-3, 3, n).astype(np.float32)}
    for m in SCHEMA.modalities:
        out[f"x/{m.name}"] = rng.standard_normal((n, m.length, m.dim)).astype(np.float32) + 1.0
        out[f"len/{m.name}"] = np.full(n, m.length, dtype=np.int64)
    return out


def loader(setting, n=64, split="train", **kw) -> SplitLoader:
    setting.modalities(NAMES)
    base = np.ones((n, 3), bool)
    present = (lambda e: setting.present(split, base, e)) if setting.redraws(split) else setting.present(split, base)
    return SplitLoader(arrays(n), SCHEMA, "score", batch_size=n, shuffle=False, seed=0, present=present,
                       transform=setting.transform, **kw)


def model(seed=0):
    torch.manual_seed(seed)
    return build_model(SCHEMA, REG, backbone="late", d_model=8, layers=1, heads=2, kernel=1, dropout=0.0,
                       fusion_layers=1)


@pytest.mark.parametrize("m", [2, 3, 5])
def test_one_case_per_incomplete_available_set(m):
    names = [f"m{i}" for i in range(m)]
    cases = case_masks(4, names)
    assert len(cases) == 2 ** m - 2
    for name, mask in cases.items():
        assert mask.shape == (4, m) and 0 < mask[0].sum() < m and (mask == mask[0]).all()
        assert name == "available:" + ".".join(n for n, k in zip(names, mask[0]) if k)


def test_training_patterns_hit_the_rate_and_are_uniform_over_incomplete_sets():
    n, rate = 12000, 0.7
    mask = present_mask(n, 3, rate, seed=0, split="train", epoch=2)
    incomplete = ~mask.all(1)
    assert abs(incomplete.mean() - rate) < 4 * np.sqrt(rate * (1 - rate) / n)
    assert mask.any(1).all()  # never empty
    counts = [(mask[incomplete] == p).all(1).sum() for p in incomplete_patterns(3, "any")]
    expected = incomplete.sum() / 6
    assert max(abs(c - expected) for c in counts) < 5 * np.sqrt(expected)


def test_per_epoch_redraw_changes_training_patterns_but_fixed_does_not():
    per_epoch = loader(build(SETTINGS, "missing", {"rate": 0.7}))
    fixed = loader(build(SETTINGS, "missing", {"rate": 0.7, "redraw": "fixed"}))
    p1, p2 = [next(iter(per_epoch)).present.clone() for _ in range(2)]
    f1, f2 = [next(iter(fixed)).present.clone() for _ in range(2)]
    assert not torch.equal(p1, p2) and torch.equal(f1, f2)
    # valid/test never redraw
    assert not build(SETTINGS, "missing", {"rate": 0.7}).redraws("valid")


def test_missing_features_are_withheld_as_nan():
    b = next(iter(loader(build(SETTINGS, "missing", {"rate": 0.9}))))
    for i, m in enumerate(NAMES):
        gone = ~b.present[:, i]
        assert gone.any() and torch.isnan(b.x[m][gone]).all() and not torch.isnan(b.x[m][~gone]).any()


@pytest.mark.parametrize("bad,match", [({"rate": 1.0}, "rate"), ({"redraw": "sometimes"}, "redraw"),
                                       ({"fill": "mean"}, "fill"), ({"test_rates": [0.2, 1.5]}, r"test_rates\[1\]")])
def test_bad_missing_parameters_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        build(SETTINGS, "missing", bad)


def test_missing_test_cases_and_rate_sweep():
    s = build(SETTINGS, "missing", {"rate": 0.7, "test_rates": [0.0, 0.5]})
    cases = s.test_cases(400, NAMES)
    assert len([c for c in cases if c.startswith("available:")]) == 6
    assert cases["rate:0"].all() and 0.3 < (~cases["rate:0.5"].all(1)).mean() < 0.7


def test_case_average_is_the_mean_of_the_available_cases():
    metrics = {"test": {"acc": 9.0}, "test:available:a": {"acc": 1.0}, "test:available:b": {"acc": 3.0},
               "test:rate:0.5": {"acc": 100.0}}
    assert case_average(metrics) == {"test:avg": {"acc": 2.0}}
    assert case_average({"test": {"acc": 1.0}, "test:available:a": {"acc": 1.0}}) == {}


def test_available_setting_gives_every_sample_the_set():
    s = build(SETTINGS, "available", {"modalities": ["c", "a"]})
    b = next(iter(loader(s)))
    assert b.present.tolist() == [[True, False, True]] * len(b)
    assert torch.isnan(b.x["b"]).all()
    assert list(s.test_cases(10, NAMES)) == ["available:a.c"]
    with pytest.raises(ValueError, match="'z'"):
        build(SETTINGS, "available", {"modalities": ["z"]}).modalities(NAMES)


@pytest.mark.parametrize("method", ["modality_substitution", "lower_bound", "modality_dropout"])
def test_substitution_never_reads_missing_features(method):
    """Perturbing a missing modality's features (NaN by default) leaves the output bit-identical."""
    net = build(TRANSFORMS, method).apply(model()).eval()
    b = next(iter(loader(build(SETTINGS, "missing", {"rate": 0.8}))))
    out = net(b).pred
    assert torch.isfinite(out).all()
    x = {m: torch.where(b.present[:, i].view(-1, 1, 1), v, torch.randn_like(v) * 100) for i, (m, v) in enumerate(b.x.items())}
    from dataclasses import replace
    assert torch.equal(net(replace(b, x=x)).pred, out)
    # and the missing inputs are really zeros, not ignored by chance: equal to feeding zeros
    zeros = {m: torch.where(b.present[:, i].view(-1, 1, 1), v, 0.0) for i, (m, v) in enumerate(b.x.items())}
    plain = model()
    assert torch.allclose(plain.eval()(replace(b, x=zeros)).pred, out)


def test_modality_dropout_drops_in_training_only():
    b = next(iter(loader(build(SETTINGS, "complete", {}), n=256)))
    seen = []
    net = build(TRANSFORMS, "modality_dropout", {"rate": 0.7}).apply(model())
    net.register_forward_pre_hook(lambda mod, args: seen.append(args[0].present.clone()))  # after the dropout hook
    torch.manual_seed(0)
    net.train()(b)
    kept = seen[-1]
    assert kept.any(1).all() and 0.5 < (~kept.all(1)).float().mean() < 0.9
    net.eval()(b)
    assert seen[-1].all()
    with pytest.raises(ValueError, match="rate"):
        build(TRANSFORMS, "modality_dropout", {"rate": 1.5})


def test_runs_score_every_case_and_their_average(synth_store):
    """A run under ``missing`` reports test:<case> per available set, test:avg and the rate sweep."""
    from conftest import default_config

    from dataclasses import asdict

    from mmrepro.config import run_spec
    from mmrepro.jobs import RunData, _model

    config = default_config()
    config["model"].update(d_model=8, heads=2)
    config["studies"]["missing"]["methods"] = ["modality_substitution"]
    config["studies"]["missing"]["settings"] = {"r": {"type": "missing", "rate": 0.7, "test_rates": [0.0, 0.5]}}
    spec = run_spec(config, "missing", "synth", "modality_substitution", "r", 0)
    data = RunData(synth_store, spec)
    torch.manual_seed(0)
    metrics = data.evaluate(build(TRANSFORMS, "modality_substitution").apply(_model(data, asdict(spec.model))), "cpu")
    cases = [k for k in metrics if k.startswith("test:available:")]
    assert len(cases) == 6 and {"valid", "test", "test:avg", "test:rate:0", "test:rate:0.5"} <= set(metrics)
    assert np.isfinite(metrics["test:avg"]["mae"])
    assert metrics["test:avg"]["mae"] == pytest.approx(np.mean([metrics[c]["mae"] for c in cases]))
    assert len({metrics[c]["mae"] for c in cases}) == 6  # the cases really differ
