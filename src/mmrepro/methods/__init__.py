"""Method families (model transforms, training hooks, test-time adapters, data settings) and registries."""

from mmrepro.methods.registry import ADAPTERS, HOOKS, SETTINGS, TRANSFORMS, MethodPlan, build, resolve_method

__all__ = ["ADAPTERS", "HOOKS", "SETTINGS", "TRANSFORMS", "MethodPlan", "build", "resolve_method"]
