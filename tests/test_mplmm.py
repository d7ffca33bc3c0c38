"""MPLMM's prompts on a frozen ``mplmm_mult`` backbone: parameter formula, never reading missing
inputs, grouping by pattern, the prompt families' effects and the zero-init quirk."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mmrepro.data.loader import Batch
from mmrepro.data.schema import DatasetSchema, ModalitySpec, TaskSpec
from mmrepro.methods import TRANSFORMS, build
from mmrepro.methods.mplmm import FAMILIES, mplmm_param_count
from mmrepro.methods.transforms import count_parameters
from mmrepro.models import build_model

REG = TaskSpec("score", "regression", value_range=(-3.0, 3.0))


def schema(dims, lengths):
    mods = tuple(ModalitySpec(f"m{i}", length=t, dim=d) for i, (d, t) in enumerate(zip(dims, lengths)))
    return DatasetSchema(name="tiny", modalities=mods, tasks=(REG,), splits=("train",))


def backbone(sch, d=8, heads=2, layers=1, seed=0, embed=0.0, **kw):
    torch.manual_seed(seed)
    return build_model(sch, REG, backbone="mplmm_mult", d_model=d, layers=layers, heads=heads, kernel=1,
                       dropout=0.0, fusion_layers=1, dropouts={"attn": 0.0, "relu": 0.0, "res": 0.0, "embed": embed,
                                                               "out": 0.0}, **kw)


def batch(sch, present, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = len(present)
    present = torch.tensor(present, dtype=torch.bool)
    x = {m.name: torch.randn(b, m.length, m.dim, generator=g) for m in sch.modalities}
    x = {m: torch.where(present[:, i].view(-1, 1, 1), v, float("nan")) for i, (m, v) in enumerate(x.items())}
    return Batch(x=x, lengths={m.name: torch.full((b,), m.length) for m in sch.modalities}, present=present,
                 y=torch.zeros(b), index=torch.arange(b))


SCH3 = schema([5, 3, 4], [6, 4, 5])
PATTERNS3 = [[1, 1, 1], [1, 0, 0], [0, 1, 1], [1, 0, 1], [0, 0, 1], [1, 1, 0], [0, 1, 0], [1, 0, 0]]


@pytest.mark.parametrize("dims,lengths", [([5, 3], [6, 4]), ([5, 3, 4], [6, 4, 5]), ([3, 2, 4, 2, 3], [3, 4, 2, 3, 2])])
@pytest.mark.parametrize("prompts", [FAMILIES, ("generative",), ("type",), ("signal", "type"), ()])
def test_trainable_parameters_follow_the_formula(dims, lengths, prompts):
    sch = schema(dims, lengths)
    t = build(TRANSFORMS, "mplmm", {"prompts": list(prompts), "prompt_length": 3})
    model = backbone(sch)
    expected = mplmm_param_count(dims, lengths, 8, 3, 1, prompts)
    assert t.param_count(model) == expected
    trainable, total = count_parameters(t.apply(model))
    assert trainable == expected and total > trainable


def test_released_code_count_on_aligned_mosi():
    """The spec's count of the released code on aligned 50-step MOSI features (d 30, l 16)."""
    assert mplmm_param_count([300, 5, 20], [50, 50, 50], 30, 16, 1) == 88141


def assert_never_reads_missing(model) -> None:
    """``model``'s output is finite and bit-identical whatever the missing modalities' features hold,
    and no NaN (the missing features) reaches a gradient of its training loss (prediction plus own loss)."""
    model.eval()
    b = batch(SCH3, PATTERNS3)
    out = model(b).pred
    assert torch.isfinite(out).all()
    x = {m: torch.where(b.present[:, i].view(-1, 1, 1), v, torch.randn_like(v) * 1e3) for i, (m, v) in enumerate(b.x.items())}
    assert torch.equal(model(replace(b, x=x)).pred, out)
    torch.manual_seed(0)
    train_out = model.train()(b)
    (train_out.pred.sum() + (0.0 if train_out.aux_loss is None else train_out.aux_loss)).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_missing_inputs_are_never_read_and_the_output_is_finite():
    assert_never_reads_missing(build(TRANSFORMS, "mplmm").apply(backbone(SCH3)))


def test_grouping_by_pattern_equals_one_sample_at_a_time():
    model = build(TRANSFORMS, "mplmm").apply(backbone(SCH3)).eval()
    b = batch(SCH3, PATTERNS3)
    whole = model(b).pred
    single = torch.cat([model(_row(b, i)).pred for i in range(len(b))])
    assert torch.allclose(whole, single, atol=1e-5)


def _row(b: Batch, i: int) -> Batch:
    return Batch(x={m: v[i:i + 1] for m, v in b.x.items()}, lengths={m: v[i:i + 1] for m, v in b.lengths.items()},
                 present=b.present[i:i + 1], y=b.y[i:i + 1], index=b.index[i:i + 1])


@pytest.mark.parametrize("family,param", [("generative", "gen_prompt"), ("generative", "time_map"),
                                          ("signal", "signal"), ("type", "type_prompt"), ("type", "type_map")])
def test_each_family_changes_the_prediction(family, param):
    model = build(TRANSFORMS, "mplmm", {"prompts": [family]}).apply(backbone(SCH3)).eval()
    b = batch(SCH3, PATTERNS3)
    before = model(b).pred
    with torch.no_grad():
        part = getattr(model.prompts, param)
        for p in part.parameters() if isinstance(part, torch.nn.Module) and not isinstance(part, torch.nn.Parameter) else [part]:
            p.add_(torch.randn_like(p))
    after = model(b).pred
    changed = (after - before).abs() > 1e-6
    if family == "generative":  # only samples with a missing modality use the generator
        incomplete = ~b.present.all(1)
        assert changed[incomplete].all() and not changed[~incomplete].any()
    else:
        assert changed.all()


def test_the_generator_reads_the_available_modalities():
    model = build(TRANSFORMS, "mplmm", {"prompts": ["generative"]}).apply(backbone(SCH3)).eval()
    b = batch(SCH3, [[1, 0, 0]] * 3)
    x = dict(b.x, m0=b.x["m0"] + 1.0)
    assert not torch.allclose(model(b).pred, model(replace(b, x=x)).pred)


@pytest.mark.parametrize("init,trains", [("normal", True), ("uniform", True), ("zeros", False)])
def test_zero_init_type_prompts_never_train(init, trains):
    """The released code's zero init: P_t and m_X each get a gradient proportional to the other: zero."""
    model = build(TRANSFORMS, "mplmm", {"prompt_init": init}).apply(backbone(SCH3, position_padding=True)).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    b = replace(batch(SCH3, PATTERNS3), y=torch.randn(len(PATTERNS3)))
    type_params = [model.prompts.type_prompt, *model.prompts.type_map]
    start = [p.detach().clone() for p in type_params]
    for _ in range(3):  # plain gradient steps (no optimizer: its first use imports a lot)
        model.zero_grad()
        torch.nn.functional.l1_loss(model(b).pred, b.y).backward()
        with torch.no_grad():
            for p in trainable:
                p -= 0.1 * p.grad
    assert any(not torch.equal(p, p0) for p, p0 in zip(type_params, start)) == trains
    if not trains:
        assert all(p.abs().sum() == 0 for p in type_params)
    assert all(p.grad.abs().sum() > 0 for p in model.prompts.signal)  # the signal prompts train either way


def test_default_init_keeps_the_prediction_on_the_input():
    """U[0, 1) type tokens swamp the read-out position (predictions hardly vary with the input);
    the default init leaves the spread of a model whose appended tokens are zero (type prompts zeroed)."""
    b = batch(SCH3, [[1, 1, 1]] * 32, seed=1)

    def spread(init, zero_type=False):
        model = build(TRANSFORMS, "mplmm", {"prompt_init": init}).apply(backbone(SCH3)).eval()
        with torch.no_grad():
            if zero_type:
                model.prompts.type_prompt.zero_()
            return float(model(b).pred.std())

    reference = spread("normal", zero_type=True)
    assert spread("normal") > 0.5 * reference
    assert spread("uniform") < 0.1 * reference


@pytest.mark.parametrize("generator_input", ["dropped", "raw"])
def test_the_generators_read_the_text_the_projection_reads_or_the_raw_one(generator_input):
    """The code feeds its text -> audio/vision generators the text after the embedding dropout (training
    only): ``dropped`` gives them the very tensor the projection reads (one draw), ``raw`` the input."""
    model = build(TRANSFORMS, "mplmm", {"prompts": ["generative"], "generator_input": generator_input}).apply(
        backbone(SCH3, embed=0.5))
    seen = []
    model.prompts.pair["0->1"].register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    b = batch(SCH3, [[1, 0, 1]] * 4)
    torch.manual_seed(3)
    dropped = model.backbone.train().drop_inputs(b).x["m0"]
    assert (dropped == 0).any() and not torch.equal(dropped, b.x["m0"])
    torch.manual_seed(3)
    model.train()(b)
    torch.testing.assert_close(seen[-1], dropped if generator_input == "dropped" else b.x["m0"], rtol=0, atol=0)
    model.eval()(b)
    torch.testing.assert_close(seen[-1], b.x["m0"], rtol=0, atol=0)  # nothing is dropped in evaluation


def test_zero_prompts_need_the_codes_position_rule():
    with pytest.raises(ValueError, match="model.position_padding must be true"):
        build(TRANSFORMS, "mplmm_gt", {"prompt_init": "zeros"}).apply(backbone(SCH3))
    build(TRANSFORMS, "mplmm_gt", {"prompt_init": "zeros"}).apply(backbone(SCH3, position_padding=True))


def test_config_refuses_zero_prompts_without_the_position_rule():
    from conftest import SCHEMA, default_config
    from mmrepro.config import ConfigError, load_schema, validate_config

    config = default_config()
    config["methods"]["mplmm"] = {"prompt_init": "zeros"}
    with pytest.raises(ConfigError, match=r"studies\.missing\.model\.position_padding: must be True for 'mplmm'"):
        validate_config(config, load_schema(SCHEMA))
    config["studies"]["missing"]["model"]["position_padding"] = True
    validate_config(config, load_schema(SCHEMA))


def test_backbone_stays_frozen_and_dataset_parts_are_reinitialised():
    base = backbone(SCH3)
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    model = build(TRANSFORMS, "mplmm").apply(base)
    for k, v in base.state_dict().items():
        fresh = k.startswith("encoders.") or k.startswith("head.out.")
        assert torch.equal(v, frozen[k]) != fresh, k
        assert base.get_parameter(k).requires_grad == fresh, k
    with pytest.raises(ValueError, match="mplmm_mult"):
        build(TRANSFORMS, "mplmm").apply(build_model(SCH3, REG, backbone="late", d_model=8, layers=1, heads=2,
                                                     kernel=1, dropout=0.0, fusion_layers=1))


@pytest.mark.parametrize("bad,match", [({"prompts": ["gen"]}, "gen"), ({"prompt_init": "gaussian"}, "prompt_init"),
                                       ({"prompt_length": 0}, "prompt_length"),
                                       ({"generator_input": "noisy"}, "generator_input")])
def test_bad_parameters_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        build(TRANSFORMS, "mplmm", bad)


def test_ablation_variants_carry_their_families():
    for name, families in [("mplmm_gt", ("generative", "type")), ("mplmm_s", ("signal",)), ("mplmm_none", ())]:
        t = build(TRANSFORMS, name, {"prompt_length": 2})
        assert t.prompts == families and t.prompt_length == 2


def test_a_backbone_from_another_dataset_loads_all_but_its_dataset_specific_layers(tmp_path):
    """MPLMM's transfer (MOSEI -> MOSI): input widths and outputs differ, everything else is loaded."""
    from mmrepro import checkpoints

    source = backbone(schema([7, 3, 4], [6, 4, 5]), seed=1)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "model.pt")
    target = backbone(SCH3, seed=2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    checkpoints.load_weights(target, checkpoints.read(tmp_path / "model.pt"))
    for k, v in target.state_dict().items():
        same_shape = source.state_dict()[k].shape == v.shape
        assert torch.equal(v, source.state_dict()[k] if same_shape else before[k]), k
    assert not torch.equal(target.state_dict()["encoders.m0.proj.weight"][:, :5], source.state_dict()["encoders.m0.proj.weight"][:, :5])
    with pytest.raises(ValueError, match="does not fit"):
        checkpoints.load_weights(backbone(SCH3, d=16, heads=2), checkpoints.read(tmp_path / "model.pt"))


def test_backbone_spec_trains_on_the_pretrain_dataset():
    from conftest import default_config

    from mmrepro.config import ConfigError, backbone_spec, load_schema, validate_config
    from conftest import SCHEMA as CONFIG_SCHEMA

    config = default_config()
    config["datasets"]["source"] = config["datasets"]["synth"]
    config["studies"]["missing"]["pretrain_dataset"] = "source"
    spec = backbone_spec(validate_config(config, load_schema(CONFIG_SCHEMA)), "missing", "synth", 0)
    assert spec.dataset == "source" and spec.task == "pretrain" and spec.study == "backbones"
    config["studies"]["missing"]["pretrain_dataset"] = "nowhere"
    with pytest.raises(ConfigError, match="studies.missing.pretrain_dataset"):
        validate_config(config, load_schema(CONFIG_SCHEMA))
