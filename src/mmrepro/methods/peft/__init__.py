"""Parameter-efficient transfer: Wander and the PEFT baselines it is compared with, as model transforms."""

from mmrepro.methods.peft import baselines  # noqa: F401  (register the transforms)
