"""Balanced multimodal learning: CGGM and the baselines it is compared with, as training hooks
(and, for MRD and the late-fusion ensembles, model transforms)."""

from mmrepro.methods.balance import (agm, cggm, gblending, greedy, late, mrd, mslr, ogm_ge, pmr, qmf,  # noqa: F401
                                     reconboost, ume, umt)
