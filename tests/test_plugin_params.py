"""Plug-in parameters: every plug-in declares its parameters' types (and ranges) in its constructor,
and the config check and every construction hold given values to that declaration."""

from __future__ import annotations

import typing

import pytest
import torch

from conftest import SCHEMA, default_config
from mmrepro.annotations import OneOf, Range, describe, numeric_kind
from mmrepro.config import ConfigError, load_schema, search_spec, validate_config
from mmrepro.methods.params import ParamError, check_params, declared
from mmrepro.methods.registry import ADAPTERS, HOOKS, METHOD_FAMILIES, TRANSFORMS, build

#: what the job hands a plug-in, never the config
CONTEXT = {"model", "source_stats", "teachers"}


def _plugins():
    return [(name, reg.get(name)) for reg in METHOD_FAMILIES.values() for name in reg.names()]


@pytest.mark.parametrize("name, cls", _plugins(), ids=[n for n, _ in _plugins()])
def test_every_parameter_has_a_type_and_every_number_a_range_or_a_reason(name, cls):
    for param in declared(cls).values():
        assert param.hint is not typing.Any, f"{name}.{param.name} has no type"
        if param.name in CONTEXT:
            continue
        kind = numeric_kind(param.hint)
        ranged = "Range(" in repr(param.hint)
        assert kind is None or ranged or (name, param.name) == ("ogm_ge", "ratio_offset"), \
            f"{name}.{param.name}: a {kind} without a declared range"  # ratio_offset: any real shift


@pytest.mark.parametrize("name, value, problem", [
    ("rho", "high", "expected float > 0, got 'high'"),
    ("rho", "1,3", "write a decimal point"),
    ("rho", -5, "must be > 0, got -5"),
    ("direction", "sideways", "must be one of ['weights', 'gradients']"),
    ("cls_heads", 0, "expected int >= 1 or null, got 0"),
    ("rhoo", 1.0, "unknown parameter; cggm takes rho, lam"),
])
def test_a_bad_value_is_named_with_what_the_declaration_says(name, value, problem):
    with pytest.raises(ParamError) as raised:
        check_params(HOOKS.get("cggm"), {name: value})
    assert raised.value.param == name and problem in raised.value.problem


def test_construction_checks_the_declaration_too():
    """Not only the config: a spec written by hand, or code, builds through the same check."""
    with pytest.raises(ValueError, match=r"lora\.r: expected int >= 1, got '8' \(a string: write it without quotes\)"):
        build(TRANSFORMS, "lora", {"r": "8"})
    with pytest.raises(ValueError, match=r"casp_contrastive\.keep_quantile: must be in \(0, 1\], got 0"):
        ADAPTERS.get("casp_contrastive")(model=torch.nn.Linear(2, 1), keep_quantile=0)
    assert build(HOOKS, "cggm", {"rho": 2, "lam": 0}).rho == 2  # YAML's 2 is an int: it fits a float


def test_a_parameter_passed_on_through_kwargs_is_declared_by_the_parent():
    params = declared(ADAPTERS.get("mean_teacher"))
    assert {"ema", "restore", "protocol", "lr", "batch_size"} <= set(params)
    with pytest.raises(ParamError, match="mean_teacher.batch_size: must be >= 1, got 0"):
        check_params(ADAPTERS.get("mean_teacher"), {"batch_size": 0})


def test_descriptions_and_ranges_read_as_words():
    assert describe(typing.Annotated[float, Range(0, 1, high_open=True)]) == "float in [0, 1)"
    assert describe(typing.Annotated[int, Range(2)] | None) == "int >= 2 or null"
    assert describe(typing.Annotated[str, OneOf(("a", "b"))]) == "one of ['a', 'b']"
    assert 1 in Range(0, 1) and 1 not in Range(0, 1, high_open=True) and 0 not in Range(0, low_open=True)


def _config(**sections) -> dict:
    raw = default_config()
    for path, value in sections.items():
        *parents, last = path.split("__")
        node = raw
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return raw


@pytest.mark.parametrize("where, value, key", [
    ("methods__cggm", {"rho": "high"}, "config key methods.cggm.rho: expected float > 0, got 'high'"),
    ("methods__lora", {"r": "8"}, "config key methods.lora.r: expected int >= 1, got '8'"),
    ("methods__mean_teacher", {"ema": 1.0}, "config key methods.mean_teacher.ema: must be in [0, 1), got 1.0"),
    ("method_variants", {"cggm_x": {"method": "cggm", "params": {"rho": -1}}},
     "config key method_variants.cggm_x.params.rho: must be > 0, got -1"),
    ("method_variants", {"two": {"method": "wander+cggm", "params": {"rank": 2}}},
     "config key method_variants.two.method: 'wander+cggm' is not one registered plug-in"),
    ("studies__balance__per_dataset", {"synth": {"methods": {"cggm": {"lam": -0.1}}}},
     "config key studies.balance.per_dataset.synth.methods.cggm.lam: must be >= 0, got -0.1"),
])
def test_the_config_check_names_the_key_of_a_bad_parameter(where, value, key):
    """Every methods.* entry is checked, used by a study or not (mechanisms sweeps read them too)."""
    config = _config(**{where: value})
    with pytest.raises(ConfigError) as raised:
        validate_config(config, load_schema(SCHEMA))
    assert key in str(raised.value)


@pytest.mark.parametrize("dist, message", [
    ({"low": -1.0, "high": 2.0}, "tune.space.cggm.methods.cggm.rho.low: must be > 0, got -1.0"),
    ({"choices": [1.0, "x"]}, "tune.space.cggm.methods.cggm.rho.choices[1]: expected float > 0, got 'x'"),
])
def test_search_ranges_lie_in_the_declared_range(dist, message):
    config = default_config()
    config["tune"]["space"]["cggm"]["methods.cggm.rho"] = dist
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        search_spec(config, "balance", "synth", "cggm")


def test_an_int_parameter_needs_an_int_range():
    config = default_config()
    config["studies"]["peft"]["methods"] = ["full_finetune", "lora"]
    config["tune"]["space"]["lora"]["methods.lora.r"] = {"low": 2, "high": 16}  # type float by default
    with pytest.raises(ConfigError, match="tune.space.lora.methods.lora.r.type: the parameter is an int"):
        search_spec(config, "peft", "synth", "lora")
