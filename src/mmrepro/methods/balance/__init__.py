"""Balanced multimodal learning: CGGM and the baselines it is compared with, as training hooks."""

from mmrepro.methods.balance import agm, cggm, greedy, mslr, ogm_ge, pmr  # noqa: F401  (register the hooks)
