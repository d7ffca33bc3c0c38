"""Missing-modality masks: which modalities each sample keeps, at a given rate and pattern protocol.

A sample becomes incomplete with probability ``rate``; an incomplete sample's pattern is drawn
uniformly among the patterns that drop at least one modality and keep at least one
(``protocol="any"``; for three modalities these are the six non-empty, non-full subsets), or
drops exactly one modality (``protocol="single"``). Masks depend only on ``(seed, split)`` and the
sample's row, so every epoch, method and job sees the same missing inputs.
"""

from __future__ import annotations

import itertools

import numpy as np

from mmrepro.data.synth import rng_for

PROTOCOLS = ("any", "single")


def incomplete_patterns(m: int, protocol: str) -> np.ndarray:
    """All keep-patterns ``(P, m)`` of the protocol: boolean rows, True = modality present."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown missing protocol {protocol!r}; known: {PROTOCOLS}")
    rows = [p for p in itertools.product([True, False], repeat=m) if 0 < sum(p) < m]
    if protocol == "single":
        rows = [p for p in rows if sum(p) == m - 1]
    return np.array(rows, dtype=bool)


def present_mask(n: int, m: int, rate: float, *, seed: int, split: str, protocol: str = "any") -> np.ndarray:
    """``(n, m)`` boolean present-mask with a fraction ``rate`` of incomplete samples in expectation."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"missing rate must lie in [0, 1), got {rate}")
    if rate == 0.0:
        return np.ones((n, m), dtype=bool)
    rng = rng_for(seed, "missing", split, protocol)
    patterns = incomplete_patterns(m, protocol)
    incomplete = rng.random(n) < rate
    choice = rng.integers(0, len(patterns), size=n)
    mask = np.ones((n, m), dtype=bool)
    mask[incomplete] = patterns[choice[incomplete]]
    return mask
