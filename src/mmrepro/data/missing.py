"""Missing-modality masks: which modalities each sample keeps, at a given rate and pattern protocol.

A sample becomes incomplete with probability ``rate``; an incomplete sample's pattern is drawn
uniformly among the patterns that drop at least one modality and keep at least one
(``protocol="any"``; for three modalities these are the six non-empty, non-full subsets), or
drops exactly one modality (``protocol="single"``). Masks depend only on ``(seed, split)``, the
sample's row and, when given, the epoch: without ``epoch`` every epoch, method and job sees the
same missing inputs (a fixed, seeded pattern per sample); with it each epoch draws afresh (as
MPLMM's code redraws a pattern every time a sample is loaded).

An evaluation *case* (:func:`case_masks`) gives every sample of a split the same available set,
one case per non-empty incomplete set (``2**M - 2``: the six columns of MPLMM's Table 1 for
``M = 3``), named ``available:<modalities joined by .>`` (characters MLflow accepts in metric names).
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


def present_mask(n: int, m: int, rate: float, *, seed: int, split: str, protocol: str = "any",
                 epoch: int | None = None) -> np.ndarray:
    """``(n, m)`` boolean present-mask with a fraction ``rate`` of incomplete samples in expectation;
    ``epoch`` (when not None) keys a fresh draw per epoch."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"missing rate must lie in [0, 1), got {rate}")
    if rate == 0.0:
        return np.ones((n, m), dtype=bool)
    rng = rng_for(seed, "missing", split, protocol, *([] if epoch is None else [f"epoch{epoch}"]))
    patterns = incomplete_patterns(m, protocol)
    incomplete = rng.random(n) < rate
    choice = rng.integers(0, len(patterns), size=n)
    mask = np.ones((n, m), dtype=bool)
    mask[incomplete] = patterns[choice[incomplete]]
    return mask


def case_name(names: list[str], keep: np.ndarray) -> str:
    """``available:text.audio``: the test case in which only the kept modalities are present."""
    return "available:" + ".".join(n for n, k in zip(names, keep) if k)


def case_masks(n: int, names: list[str]) -> dict[str, np.ndarray]:
    """One ``(n, M)`` mask per incomplete, non-empty available set (``2**M - 2`` cases), every row alike."""
    return {case_name(names, keep): np.tile(keep, (n, 1)) for keep in incomplete_patterns(len(names), "any")}
