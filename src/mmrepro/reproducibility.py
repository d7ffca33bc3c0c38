"""Seeds, threads and determinism: one call at the start of every job."""

from __future__ import annotations

import os
import random

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
    torch.use_deterministic_algorithms(True, warn_only=True)
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = False
