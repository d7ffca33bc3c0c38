"""Balanced multimodal learning: CGGM and the baselines it is compared with, as training hooks."""

from mmrepro.methods.balance import cggm  # noqa: F401  (registers the hook)
