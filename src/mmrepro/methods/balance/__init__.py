"""Balanced multimodal learning: CGGM and the baselines it is compared with, as training hooks."""

from mmrepro.methods.balance import cggm, greedy, mslr, pmr  # noqa: F401  (register the hooks)
