"""Evaluation metrics, computed the way the multimodal-sentiment literature computes them.

All functions are plain numpy. Inputs may be numpy arrays, lists, or anything :func:`numpy.asarray`
accepts (a tensor with ``.detach()`` is detached and moved to the CPU first). Every function returns
plain Python floats, unrounded.

What was checked against the reference
--------------------------------------
The sentiment metrics follow the MMSA toolkit (``thuiar/MMSA``, file
``src/MMSA/utils/metricsTop.py``; the metric logic is the same at commits ``4e5fdb5`` and
``177bc04``). Read from that file, in our own words:

MOSI / MOSEI regression (labels in [-3, 3]) -- :func:`regression_metrics`

* **MAE** and **Corr** (Pearson) use the raw predictions and labels, *not* clipped.
* **Acc-7**: prediction and label are both clipped to [-3, 3], then both are rounded with
  ``np.round`` and compared for equality. **Acc-5** is the same with clipping to [-2, 2].
  ``np.round`` rounds halves to the nearest *even* integer (banker's rounding): 2.5 -> 2,
  1.5 -> 2, 0.5 -> 0, -0.5 -> -0, -2.5 -> -2. Clipping happens before rounding (with integer
  bounds the order does not change the result, but *not* clipping does: 3.7 vs a label of 3
  is a hit for Acc-7 only because 3.7 is clipped to 3).
* **Acc-2 / F1 "has-0"**: every sample is kept; both prediction and label are binarised with
  ``>= 0`` (so a label or prediction of exactly 0 counts as the positive class).
* **Acc-2 / F1 "non-0"**: samples whose *label* is exactly 0 are removed (the prediction is not
  consulted for the removal); the rest are binarised with ``> 0`` on both sides (so a
  prediction of exactly 0 counts as negative).
* **F1** is sklearn's ``f1_score(truth, pred, average='weighted')``: per-class F1 averaged with
  weights equal to each class's support in the truth (see :func:`weighted_f1`).
* MMSA also computes a clipped-to-[-1, 1] Acc-3 for MOSI/MOSEI but does not report it; it is
  not computed here. MMSA rounds its MOSI/MOSEI results to 4 decimals; we do not round.

CH-SIMS regression (labels in [-1, 1]) -- :func:`sims_metrics`

* Prediction and label are both clipped to [-1, 1] *first*, and MAE and Corr are computed on the
  clipped values (unlike MOSI/MOSEI).
* Classes are intervals open on the left and closed on the right (MMSA writes the outer edges as
  -1.01 and 1.01, which after clipping just means "everything"):

  - Acc-2: [-1, 0], (0, 1]                      -> 0 counts as *negative* here
  - Acc-3: [-1, -0.1], (-0.1, 0.1], (0.1, 1]
  - Acc-5: [-1, -0.7], (-0.7, -0.1], (-0.1, 0.1], (0.1, 0.7], (0.7, 1]

* **F1** is the weighted F1 of the Acc-2 classes only.
* The bin comparisons are done in the input's own floating dtype (MMSA feeds float32 tensors, so
  its edges behave as float32 numbers): a float32 label of 0.1 lands in the closed upper edge of
  the neutral class, as in MMSA, instead of being widened to 0.1000000015 in float64 and moved up.
  Integer inputs are compared in float64. MAE/Corr are accumulated in float64.

Conventions of this module (not from MMSA)

* **Corr** is defined as 0.0 when either side has zero variance (all values equal, including a
  single sample); ``np.corrcoef`` would return NaN with a warning.
* **non-0 metrics** are NaN when every label is exactly 0 (nothing is left to score).
* :func:`classification_metrics` is a generic accuracy + weighted F1 on class labels or on score
  matrices (argmax over the last axis); it does not reproduce MMSA's 3-class sentiment branch.
* :func:`dice_per_region` scores BraTS label volumes (labels 0, 1, 2, 4; 3 is accepted as an
  alias of 4) on the nested regions ET = {4}, TC = {1, 4}, WT = {1, 2, 4}. When a region is empty
  in both prediction and truth its Dice is **1.0** (the BraTS challenge convention).
  :class:`DiceMeter` / :func:`segmentation_metrics` average it **per case** over a split
  (cases on axis 0), never pooling voxels across cases.

Bad input is never scored silently: empty arrays, mismatched lengths, non-numeric data, and
NaN/inf values raise :class:`ValueError` naming the argument and how many values are bad.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

__all__ = [
    "METRIC_DIRECTIONS",
    "TASKS",
    "classification_metrics",
    "DiceMeter",
    "compute",
    "dice_per_region",
    "official_acc2",
    "regression_metrics",
    "segmentation_metrics",
    "sims_metrics",
    "weighted_f1",
]

# Interior class edges for CH-SIMS; classes are (e_i, e_{i+1}] after clipping to [-1, 1].
SIMS_EDGES: dict[str, tuple[float, ...]] = {
    "acc2": (0.0,),
    "acc3": (-0.1, 0.1),
    "acc5": (-0.7, -0.1, 0.1, 0.7),
}

BRATS_LABELS = (0, 1, 2, 3, 4)  # 3 is an alias of 4 (enhancing tumour)

METRIC_DIRECTIONS: dict[str, str] = {
    # regression (MOSI / MOSEI)
    "mae": "min",
    "corr": "max",
    "acc2_has0": "max",
    "f1_has0": "max",
    "acc2_non0": "max",
    "f1_non0": "max",
    "acc5": "max",
    "acc7": "max",
    # sims_regression (CH-SIMS)
    "acc2": "max",
    "f1": "max",
    "acc3": "max",
    # classification
    "acc": "max",
    "f1_weighted": "max",
    # segmentation (BraTS)
    "dice_et": "max",
    "dice_tc": "max",
    "dice_wt": "max",
    "dice_mean": "max",
}


# --------------------------------------------------------------------------------------------
# input checks


def _as_array(x: Any, name: str) -> np.ndarray:
    """``x`` as a non-empty, finite, real numeric array; ValueError naming ``name`` otherwise."""
    if hasattr(x, "detach") and callable(x.detach):  # torch tensors, without importing torch
        x = x.detach()
        if hasattr(x, "cpu"):
            x = x.cpu()
        if hasattr(x, "numpy"):
            x = x.numpy()
    try:
        a = np.asarray(x)
    except Exception as exc:  # ragged lists and the like
        raise ValueError(f"{name} could not be converted to an array: {exc}") from exc
    if a.dtype == bool:
        a = a.astype(np.int64)
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise ValueError(f"{name} must be real numeric, got dtype {a.dtype}")
    if a.size == 0:
        raise ValueError(f"{name} is empty (shape {a.shape}); need at least one value")
    if np.issubdtype(a.dtype, np.floating):
        n_nan = int(np.isnan(a).sum())
        n_inf = int(np.isinf(a).sum())
        if n_nan or n_inf:
            raise ValueError(
                f"{name} has {n_nan + n_inf} non-finite value(s) of {a.size} "
                f"({n_nan} NaN, {n_inf} inf)"
            )
    return a


def _check_lengths(a: np.ndarray, b: np.ndarray, name_a: str = "pred", name_b: str = "truth") -> None:
    if len(a) != len(b):
        raise ValueError(f"length mismatch: {name_a} has {len(a)} values but {name_b} has {len(b)}")


def _as_values(x: Any, name: str) -> np.ndarray:
    """Flattened 1-D float array; float inputs keep their dtype, integers become float64."""
    a = _as_array(x, name).reshape(-1)
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
    return a


def _pair(pred: Any, truth: Any) -> tuple[np.ndarray, np.ndarray]:
    p = _as_values(pred, "pred")
    t = _as_values(truth, "truth")
    _check_lengths(p, t)
    return p, t


def _as_int_labels(a: np.ndarray, name: str) -> np.ndarray:
    """Integer-valued array as int64 (floats allowed only if every value is a whole number)."""
    if np.issubdtype(a.dtype, np.integer):
        return a.astype(np.int64, copy=False)
    bad = int(np.count_nonzero(a != np.round(a)))
    if bad:
        raise ValueError(f"{name} must hold integer class labels; {bad} of {a.size} value(s) are not whole numbers")
    return a.astype(np.int64)


# --------------------------------------------------------------------------------------------
# building blocks


def _pearson(p: np.ndarray, t: np.ndarray) -> float:
    """Pearson correlation in float64; 0.0 when either side has zero variance."""
    p = p.astype(np.float64)
    t = t.astype(np.float64)
    if np.ptp(p) == 0 or np.ptp(t) == 0:
        return 0.0
    pc = p - p.mean()
    tc = t - t.mean()
    den = np.sqrt(np.dot(pc, pc) * np.dot(tc, tc))
    if den == 0:  # underflow on tiny spreads
        return 0.0
    return float(np.clip(np.dot(pc, tc) / den, -1.0, 1.0))


def _accuracy(p: np.ndarray, t: np.ndarray) -> float:
    return float(np.mean(p == t))


def _round_acc(p: np.ndarray, t: np.ndarray, bound: float) -> float:
    """Clip both sides to [-bound, bound], round half-to-even (np.round), compare."""
    return _accuracy(np.round(np.clip(p, -bound, bound)), np.round(np.clip(t, -bound, bound)))


def _bin(x: np.ndarray, edges: tuple[float, ...]) -> np.ndarray:
    """Class index for left-open/right-closed bins: the number of edges strictly below x.

    The edges are cast to ``x``'s floating dtype so the comparison happens in that precision.
    """
    e = np.asarray(edges, dtype=x.dtype)
    return np.searchsorted(e, x, side="left")


def weighted_f1(pred_labels: Any, truth_labels: Any) -> float:
    """Support-weighted F1, as sklearn's ``f1_score(truth, pred, average='weighted')``.

    The classes are every label present in truth or pred. Per class c, with tp/fp/fn counted on
    c, F1_c = 2 tp / (2 tp + fp + fn), or 0 when that is 0/0 (c never predicted and never true).
    The result is the mean of F1_c weighted by c's support in the truth, so a class that appears
    only in the predictions has weight 0 (its false positives still lower the other classes'
    precision). Labels may be any finite numbers and are compared for equality; arrays are flattened.
    """
    p = _as_array(pred_labels, "pred_labels").reshape(-1)
    t = _as_array(truth_labels, "truth_labels").reshape(-1)
    _check_lengths(p, t, "pred_labels", "truth_labels")
    classes, inv = np.unique(np.concatenate([t, p]), return_inverse=True)
    k = len(classes)
    ti, pi = inv[: len(t)], inv[len(t):]
    support = np.bincount(ti, minlength=k).astype(np.float64)
    predicted = np.bincount(pi, minlength=k).astype(np.float64)
    tp = np.bincount(ti[ti == pi], minlength=k).astype(np.float64)
    denom = support + predicted  # = 2 tp + fp + fn
    f1 = np.divide(2.0 * tp, denom, out=np.zeros(k), where=denom > 0)
    return float(np.dot(f1, support) / support.sum())


# --------------------------------------------------------------------------------------------
# public metric sets


def regression_metrics(pred: Any, truth: Any) -> dict[str, float]:
    """MOSI/MOSEI metrics for sentiment scores in [-3, 3] (MMSA's definitions; module docstring).

    Keys: ``mae``, ``corr``, ``acc2_has0``, ``f1_has0``, ``acc2_non0``, ``f1_non0``, ``acc5``,
    ``acc7``. ``corr`` is 0.0 if either side is constant; the non-0 pair is NaN if every label is 0.
    """
    p, t = _pair(pred, truth)
    p64, t64 = p.astype(np.float64), t.astype(np.float64)
    out = {"mae": float(np.mean(np.abs(p64 - t64))), "corr": _pearson(p64, t64)}

    bp, bt = p >= 0, t >= 0
    out["acc2_has0"] = _accuracy(bp, bt)
    out["f1_has0"] = weighted_f1(bp, bt)

    keep = t != 0
    if keep.any():
        bp, bt = p[keep] > 0, t[keep] > 0
        out["acc2_non0"] = _accuracy(bp, bt)
        out["f1_non0"] = weighted_f1(bp, bt)
    else:
        out["acc2_non0"] = out["f1_non0"] = float("nan")

    out["acc5"] = _round_acc(p, t, 2.0)
    out["acc7"] = _round_acc(p, t, 3.0)
    return out


def official_acc2(pred: Any, truth: Any) -> float:
    """The Acc-2 the released codes of CASP, CGGM and Wander pick epochs by (``eval_senti``):
    ``pred > 0`` against ``truth > 0`` over every sample, so a zero label counts as negative (unlike
    MMSA's ``acc2_has0``, where it counts positive)."""
    return float(np.mean((np.asarray(pred) > 0) == (np.asarray(truth) > 0)))


def sims_metrics(pred: Any, truth: Any) -> dict[str, float]:
    """CH-SIMS metrics for sentiment scores in [-1, 1] (MMSA's bins; module docstring).

    Keys: ``mae``, ``corr`` (both on values clipped to [-1, 1]), ``acc2``, ``f1`` (weighted F1 of
    the two Acc-2 classes), ``acc3``, ``acc5``.
    """
    p, t = _pair(pred, truth)
    p = np.clip(p, -1.0, 1.0).astype(p.dtype, copy=False)
    t = np.clip(t, -1.0, 1.0).astype(t.dtype, copy=False)
    p64, t64 = p.astype(np.float64), t.astype(np.float64)
    out = {"mae": float(np.mean(np.abs(p64 - t64))), "corr": _pearson(p64, t64)}
    p2, t2 = _bin(p, SIMS_EDGES["acc2"]), _bin(t, SIMS_EDGES["acc2"])
    out["acc2"] = _accuracy(p2, t2)
    out["f1"] = weighted_f1(p2, t2)
    out["acc3"] = _accuracy(_bin(p, SIMS_EDGES["acc3"]), _bin(t, SIMS_EDGES["acc3"]))
    out["acc5"] = _accuracy(_bin(p, SIMS_EDGES["acc5"]), _bin(t, SIMS_EDGES["acc5"]))
    return out


def classification_metrics(pred: Any, truth: Any, num_classes: int | None = None) -> dict[str, float]:
    """Accuracy and support-weighted F1 for class labels.

    ``pred`` is either integer labels of shape (N,) (or (N, 1)) or scores/logits of shape (N, K)
    with K > 1, reduced by argmax over K. ``truth`` holds N integer labels (flattened). When
    ``num_classes`` is given, scores must have K == num_classes and every label must lie in
    [0, num_classes). Keys: ``acc``, ``f1_weighted``.
    """
    pa = _as_array(pred, "pred")
    t = _as_int_labels(_as_array(truth, "truth").reshape(-1), "truth")
    if pa.ndim == 2 and pa.shape[1] > 1:
        if num_classes is not None and pa.shape[1] != num_classes:
            raise ValueError(f"pred has scores for {pa.shape[1]} classes but num_classes={num_classes}")
        p = np.argmax(pa, axis=1).astype(np.int64)
    elif pa.ndim <= 1 or (pa.ndim == 2 and pa.shape[1] == 1):
        p = _as_int_labels(pa.reshape(-1), "pred")
    else:
        raise ValueError(f"pred must be labels (N,) or scores (N, K); got shape {pa.shape}")
    _check_lengths(p, t)
    if num_classes is not None:
        for name, a in (("pred", p), ("truth", t)):
            bad = int(np.count_nonzero((a < 0) | (a >= num_classes)))
            if bad:
                raise ValueError(f"{name} has {bad} label(s) outside [0, {num_classes})")
    return {"acc": _accuracy(p, t), "f1_weighted": weighted_f1(p, t)}


def _dice(p: np.ndarray, t: np.ndarray) -> float:
    sp, st = int(np.count_nonzero(p)), int(np.count_nonzero(t))
    if sp + st == 0:
        return 1.0  # region absent from both: BraTS convention
    return 2.0 * int(np.count_nonzero(p & t)) / (sp + st)


def _label_volume(x: Any, name: str) -> np.ndarray:
    a = _as_int_labels(_as_array(x, name), name)
    bad = ~np.isin(a, BRATS_LABELS)
    if bad.any():
        found = sorted(int(v) for v in np.unique(a[bad]))
        raise ValueError(
            f"{name} has {int(bad.sum())} voxel(s) with labels {found} outside the BraTS set "
            f"{{0, 1, 2, 4}} (3 allowed as an alias of 4)"
        )
    return a


def dice_per_region(pred: Any, truth: Any) -> dict[str, float]:
    """Dice of the BraTS regions ET={4}, TC={1,4}, WT={1,2,4} between two label volumes.

    ``pred`` and ``truth`` are integer label arrays of the same shape with labels in
    {0, 1, 2, 4}; 3 is read as 4. A region empty in both gives Dice 1.0. Keys: ``dice_et``,
    ``dice_tc``, ``dice_wt`` and their mean ``dice_mean``.
    """
    p = _label_volume(pred, "pred")
    t = _label_volume(truth, "truth")
    if p.shape != t.shape:
        raise ValueError(f"shape mismatch: pred has shape {p.shape} but truth has shape {t.shape}")
    p_et, t_et = (p == 4) | (p == 3), (t == 4) | (t == 3)
    p_tc, t_tc = p_et | (p == 1), t_et | (t == 1)
    p_wt, t_wt = p_tc | (p == 2), t_tc | (t == 2)
    out = {"dice_et": _dice(p_et, t_et), "dice_tc": _dice(p_tc, t_tc), "dice_wt": _dice(p_wt, t_wt)}
    out["dice_mean"] = float(np.mean(list(out.values())))
    return out


DICE_KEYS = ("dice_et", "dice_tc", "dice_wt", "dice_mean")


class DiceMeter:
    """Per-case BraTS Dice averaged over cases, accumulated batch by batch.

    ``update(pred, truth)`` takes a batch of label volumes ``(B, *spatial)`` (axis 0 = cases),
    scores each case with :func:`dice_per_region` (so a region empty in both prediction and
    truth scores 1.0) and keeps only running sums, so a split is scored without holding its
    predictions. ``result()`` gives the mean over cases of each key; ``dice_mean`` is then the
    mean of the three region means. This per-case average is the BraTS challenge's convention
    (a large tumour does not outweigh a small one); CGGM's code averages per-slice Dice instead.
    """

    def __init__(self) -> None:
        self.sums = dict.fromkeys(DICE_KEYS, 0.0)
        self.n = 0

    def update(self, pred: Any, truth: Any) -> None:
        p, t = _as_array(pred, "pred"), _as_array(truth, "truth")
        if p.shape != t.shape or p.ndim < 2:
            raise ValueError(f"pred and truth must be batches of label volumes of one shape (cases first); "
                             f"got {p.shape} and {t.shape}")
        for pc, tc in zip(p, t):
            for k, v in dice_per_region(pc, tc).items():
                self.sums[k] += v
            self.n += 1

    def result(self) -> dict[str, float]:
        if not self.n:
            raise ValueError("no case was scored")
        return {k: self.sums[k] / self.n for k in DICE_KEYS}


def segmentation_metrics(pred: Any, truth: Any) -> dict[str, float]:
    """:class:`DiceMeter` over label volumes ``(N, *spatial)``: per-case Dice averaged over the N cases.

    (:func:`dice_per_region` instead scores its inputs as *one* volume, pooling all voxels.)
    """
    meter = DiceMeter()
    meter.update(pred, truth)
    return meter.result()


TASKS: dict[str, Callable[..., dict[str, float]]] = {
    "regression": regression_metrics,
    "sims_regression": sims_metrics,
    "classification": classification_metrics,
    "segmentation": dice_per_region,
}


def compute(task: str, pred: Any, truth: Any, **kwargs: Any) -> dict[str, float]:
    """The metric set of ``task`` (one of :data:`TASKS`); extra keywords go to that function
    (e.g. ``num_classes`` for classification)."""
    try:
        fn = TASKS[task]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(sorted(TASKS))}") from None
    return fn(pred, truth, **kwargs)
