"""Plug-in parameters: a plug-in's constructor signature is the one declaration of its parameters.

Names, defaults and types come from the signature; ranges and choices ride on the types as
``Annotated`` metadata (:class:`~mmrepro.annotations.Range`, :class:`~mmrepro.annotations.OneOf`,
or the aliases below: ``rho: Positive = 1.3``). A constructor that passes ``**kwargs`` on declares
its parent's parameters too. The config check (``methods.<name>``, per-dataset overrides,
``method_variants``, search-space bounds) and every construction of a registered plug-in
(:func:`checked`, applied by :meth:`mmrepro.methods.registry.Registry.register`) hold given values
to the declaration, so ``methods.cggm.rho: high`` fails naming its key before any job, not as a
``TypeError`` mid-run.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from mmrepro.annotations import OneOf, Range, problem

PositiveInt = Annotated[int, Range(1)]
Count = Annotated[int, Range(0)]
Positive = Annotated[float, Range(0, low_open=True)]
NonNegative = Annotated[float, Range(0)]
Fraction = Annotated[float, Range(0, 1)]
#: a probability below one: a dropout rate, a momentum
Rate = Annotated[float, Range(0, 1, high_open=True)]

__all__ = ["Count", "Fraction", "NonNegative", "OneOf", "ParamError", "Positive", "PositiveInt", "Range", "Rate",
           "check_params", "checked", "declared"]


class ParamError(ValueError):
    """A parameter value the plug-in's declaration refuses: ``plugin.param: problem``."""

    def __init__(self, plugin: str, param: str, problem: str):
        super().__init__(f"{plugin}.{param}: {problem}")
        self.plugin, self.param, self.problem = plugin, param, problem


@dataclass(frozen=True)
class Param:
    name: str
    hint: Any
    default: Any  # inspect.Parameter.empty: required


def _init(cls) -> Any:
    """The constructor ``cls`` runs (unwrapped), or None for one that takes no parameters."""
    for klass in cls.__mro__:
        if "__init__" in klass.__dict__:
            return None if klass is object else inspect.unwrap(klass.__dict__["__init__"])
    return None


def declared(cls) -> dict[str, Param]:
    """The parameters ``cls`` accepts, with their declared types (through ``**kwargs`` passed on)."""
    out: dict[str, Param] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        init = inspect.unwrap(init)
        hints = typing.get_type_hints(init, include_extras=True)
        params = list(inspect.signature(init).parameters.values())[1:]
        for p in params:
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name not in out:
                out[p.name] = Param(p.name, hints.get(p.name, Any), p.default)
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return out


def check_params(cls, params: Mapping[str, Any], *, name: str | None = None) -> None:
    """Every given parameter is one ``cls`` declares, of its type, in its range: else
    :class:`ParamError` for the first that is not."""
    plugin = name or getattr(cls, "name", cls.__name__)
    known = declared(cls)
    for key, value in params.items():
        if key not in known:
            raise ParamError(plugin, key, f"unknown parameter; {plugin} takes {', '.join(known) or 'none'}")
        wrong = problem(value, known[key].hint)
        if wrong is not None:
            raise ParamError(plugin, key, wrong)


def checked(cls):
    """``cls`` with a constructor that first checks its arguments against its declaration (an
    inherited constructor that checks already is left as it is)."""
    init = cls.__init__
    if _init(cls) is None or hasattr(init, "__params_checked__"):
        return cls
    signature = inspect.signature(init)
    var_keyword = [p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD]

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        given = dict(signature.bind_partial(self, *args, **kwargs).arguments)
        given.pop(next(iter(signature.parameters)))  # self
        for k in var_keyword:
            given.update(given.pop(k, {}))
        check_params(cls, given, name=getattr(type(self), "name", None))
        init(self, *args, **kwargs)

    __init__.__params_checked__ = True
    cls.__init__ = __init__
    return cls
