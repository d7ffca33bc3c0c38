"""Seeds, threads and determinism: one call at the start of every job."""

from __future__ import annotations

import os
import random
import sys

import numpy as np
import torch


def configure(seed: int, threads: int) -> None:
    """Seed every generator, use ``threads`` CPU threads and deterministic kernels.

    Snakemake passes the rule's ``threads`` and exports ``OMP_NUM_THREADS``; both end up here so a
    job never oversubscribes the cores the scheduler gave it. With the same seed and thread count
    a CPU run is bit-for-bit repeatable.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, threads))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    _enable_deterministic_kernels()
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = False


def _enable_deterministic_kernels() -> None:
    """Turn on PyTorch's deterministic-kernel flag without importing the compiler stack.

    ``torch.use_deterministic_algorithms`` also sets TorchInductor's ``deterministic`` option, and
    importing ``torch._inductor`` for that costs about 3 s per job on a 2-core CPU (as much as
    importing torch itself) while no job here compiles a model. The flag the kernels read is the
    one set below; where inductor is already loaded, or the private setter is gone in a future
    torch, the public call is used.
    """
    set_flag = getattr(torch._C, "_set_deterministic_algorithms", None)
    if set_flag is None or "torch._inductor" in sys.modules:
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        set_flag(True, warn_only=True)
