"""Parameter-efficient transfer: Wander and the PEFT baselines it is compared with, as model transforms."""

from mmrepro.methods.peft import baselines, wander  # noqa: F401  (register the transforms)
from mmrepro.methods.peft import uniadapter  # noqa: F401
from mmrepro.methods.peft import pmf  # noqa: F401
from mmrepro.methods.peft import mma  # noqa: F401
