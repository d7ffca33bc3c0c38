"""Method families (model transforms, training hooks, test-time adapters, data settings) and registries.

Importing the package imports every plug-in module, which registers its classes
(:mod:`mmrepro.methods.registry`): the registries are full wherever they are read.
"""

from mmrepro.methods.registry import ADAPTERS, HOOKS, SETTINGS, TRANSFORMS, MethodPlan, build, resolve_method
from mmrepro.methods import (adapters, balance, casp, hooks, imagination, incomplete, map_prompts,  # noqa: F401, E402
                             mplmm, peft, settings, transforms, tta_baselines)

__all__ = ["ADAPTERS", "HOOKS", "SETTINGS", "TRANSFORMS", "MethodPlan", "build", "resolve_method"]
