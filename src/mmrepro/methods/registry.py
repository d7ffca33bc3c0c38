"""Registries of plug-in methods, one per family, and how a method name resolves to plug-ins.

A method is a class registered by name in exactly one family. A run's method string names one
plug-in, or several of different families joined by ``+`` (``wander+cggm``: Wander's transform
trained with CGGM's hook); every family left unnamed gets its trivial member, except that a hook
may name (class attribute ``transform``) the model transform whose model it trains (QMF's
late-fusion heads, for example): naming the hook then picks that transform.

A plug-in's constructor declares its parameters (:mod:`mmrepro.methods.params`); registering it
makes every construction check them. The plug-in modules import this module to register themselves; the package (``mmrepro.methods``)
imports them all, so that whoever imports this module from outside finds the registries full.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from mmrepro.methods.params import checked
from mmrepro.spec import MethodPlan

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, family: str, default: str):
        self.family, self.default = family, default
        self._items: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def add(cls: type[T]) -> type[T]:
            if name in self._items:
                raise ValueError(f"{self.family} {name!r} is registered twice")
            self._items[name] = cls
            cls.name = name
            return checked(cls)
        return add

    def get(self, name: str) -> type[T]:
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"unknown {self.family} {name!r}; known: {sorted(self._items)}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def names(self) -> list[str]:
        return sorted(self._items)


TRANSFORMS: Registry = Registry("model transform", default="full_finetune")
HOOKS: Registry = Registry("training hook", default="joint")
ADAPTERS: Registry = Registry("test-time adapter", default="source_only")
SETTINGS: Registry = Registry("data setting", default="complete")

METHOD_FAMILIES = {"transform": TRANSFORMS, "hook": HOOKS, "adapter": ADAPTERS}


def resolve_method(method: str) -> MethodPlan:
    """Split ``a+b`` into one plug-in per family; unknown names and two of one family raise."""
    chosen: dict[str, str] = {}
    for part in method.split("+"):
        families = [f for f, reg in METHOD_FAMILIES.items() if part in reg]
        if not families:
            known = sorted(n for reg in METHOD_FAMILIES.values() for n in reg.names())
            raise KeyError(f"unknown method {part!r}; known: {known}")
        family = families[0]
        if family in chosen:
            raise ValueError(f"method {method!r} names two {METHOD_FAMILIES[family].family}s: "
                             f"{chosen[family]!r} and {part!r}")
        chosen[family] = part
    needed = getattr(HOOKS.get(chosen["hook"]), "transform", None) if "hook" in chosen else None
    if needed is not None:  # a hook that trains a model of its own shape names the transform that builds it
        if chosen.get("transform", needed) != needed:
            raise ValueError(f"method {method!r}: hook {chosen['hook']!r} trains the model transform {needed!r}, "
                             f"not {chosen['transform']!r}")
        chosen["transform"] = needed
    return MethodPlan(**{f: chosen.get(f, reg.default) for f, reg in METHOD_FAMILIES.items()})


def build(registry: Registry, name: str, params: dict[str, Any] | None = None, **context: Any):
    """Instantiate a registered plug-in with its config params; unknown params raise TypeError."""
    cls = registry.get(name)
    try:
        return cls(**(params or {}), **context)
    except TypeError as e:
        raise TypeError(f"{registry.family} {name!r}: bad parameters {sorted(params or {})}: {e}") from None
