"""Whether a value fits a type annotation, ranges and choices included.

The run spec's fields (:mod:`mmrepro.spec`) and the plug-ins' constructor parameters
(:mod:`mmrepro.methods.params`) are declared with annotations; values read from JSON or YAML are
checked against them before a job uses them. A range or a set of choices rides on the type as
``Annotated`` metadata (``Annotated[float, Range(0, low_open=True)]``), so that the declaration
stays the one source of both.
"""

from __future__ import annotations

import collections.abc
import numbers
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union


@dataclass(frozen=True)
class Range:
    """Bounds of a number: ``low`` / ``high`` (None: unbounded), each inclusive unless ``*_open``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'<' if self.high_open else '<='} {self.high:g}" if self.high is not None else "any number"


@dataclass(frozen=True)
class OneOf:
    """The values a string (or other scalar) may take."""

    choices: tuple

    def __init__(self, choices: collections.abc.Iterable) -> None:
        object.__setattr__(self, "choices", tuple(choices))

    def __contains__(self, value: Any) -> bool:
        return value in self.choices

    def __str__(self) -> str:
        return f"one of {list(self.choices)}"


def _constraints(hint: Any) -> tuple[Any, list[Range | OneOf]]:
    """``hint`` without its ``Annotated`` metadata, and the ranges and choices in that metadata."""
    if typing.get_origin(hint) is Annotated:
        base, *meta = typing.get_args(hint)
        return base, [m for m in meta if isinstance(m, (Range, OneOf))]
    return hint, []


def fits(value: Any, hint: Any) -> bool:
    """``value`` is of type ``hint`` (JSON and YAML write 1.0 as 1: an int fits a float; a bool fits
    neither; a list or tuple fits a list or sequence), within its ranges and choices."""
    return problem(value, hint) is None


def problem(value: Any, hint: Any) -> str | None:
    """What is wrong with ``value`` as a ``hint``, phrased to follow the name of what holds it
    (``expected float > 0, got 'high'``, ``must be > 0, got -5``); None when it fits."""
    base, constraints = _constraints(hint)
    if not _fits_type(value, base):
        return f"expected {describe(hint)}, got {value!r}{_quoted_number(value, base)}"
    for c in constraints:
        if value not in c:
            return f"must be {c}, got {value!r}"
    return None


def _fits_type(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin is Annotated:
        return problem(value, hint) is None
    if origin in (Union, types.UnionType):
        return any(problem(value, arg) is None for arg in typing.get_args(hint))
    if origin is Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if origin is dict:
        key_hint, value_hint = typing.get_args(hint)
        return isinstance(value, dict) and all(fits(k, key_hint) and fits(v, value_hint) for k, v in value.items())
    if origin in (list, collections.abc.Sequence):
        (item_hint,) = typing.get_args(hint)
        return isinstance(value, (list, tuple)) and all(fits(v, item_hint) for v in value)
    return isinstance(value, origin or hint)


def _quoted_number(value: Any, hint: Any) -> str:
    """A hint for a number written as a string (``"8"``, ``1,3``): how YAML reads it."""
    if not isinstance(value, str) or not any(_fits_type(1, h) for h in _arms(hint)):
        return ""
    for text, why in ((value, "a string: write it without quotes"),
                      (value.replace(",", "."), "a string: YAML reads a comma as text; write a decimal point")):
        try:
            float(text)
        except ValueError:
            continue
        return f" ({why})"
    return ""


def numeric_kind(hint: Any) -> str | None:
    """``"int"`` or ``"float"`` for a numeric annotation (an optional or ranged one too), else None."""
    arms = [_constraints(arm)[0] for arm in _arms(_constraints(hint)[0])]
    return "int" if int in arms else ("float" if float in arms else None)


def _arms(hint: Any) -> tuple:
    return typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)


def describe(hint: Any) -> str:
    """An annotation in words: ``float > 0``, ``int >= 1 or null``, ``list of str``."""
    base, constraints = _constraints(hint)
    if any(isinstance(c, OneOf) for c in constraints):
        return " ".join(map(str, constraints))
    if constraints:
        return " ".join([describe(base), *map(str, constraints)])
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(arg) for arg in typing.get_args(hint))
    if origin is Literal:
        return f"one of {list(typing.get_args(hint))}"
    if hint is type(None):
        return "null"
    if origin in (list, collections.abc.Sequence):
        return f"list of {describe(typing.get_args(hint)[0])}"
    if origin is dict:
        key, value = typing.get_args(hint)
        return f"dict of {describe(key)} to {describe(value)}"
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
