"""Paired differences against a reference method, their bootstrap interval, and the verdict rule.

A claim such as "method A beats method B" is about the difference A - B on the same data and seed,
not about two means with their spreads: each seed trains both on the same store with the same
initial draw, so the per-seed difference removes what the seeds share. For each (dataset, backbone,
setting) the differences over the seeds both methods ran are summarised by their mean and a
percentile bootstrap interval: ``resamples`` resamples of the seeds with replacement (a seeded
NumPy generator), the mean difference of each, and the ``(1 - level) / 2`` and ``(1 + level) / 2``
quantiles of those means. With few seeds this interval is narrower than a t interval would be; it
is what the issue asked for and is stated wherever it is shown.

The verdict rule was fixed here before any measurement: **holds** when the interval excludes zero
on the method's side (its metric better than the rival's), **contradicted** when it excludes zero on
the other side, **undecided** otherwise. A claim made of several comparisons (rivals, settings,
backbones, metrics) holds when every comparison holds, is contradicted when any comparison is, and is
undecided otherwise; no correction for the number of comparisons is applied.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .figures import save
from .render import LOWER_IS_BETTER, MAIN_METRIC, header_of, unit_of
from .tables import HEADLINE, split_rows

__all__ = ["Interval", "HOLDS", "CONTRADICTED", "UNDECIDED", "Bootstrap", "paired_differences",
           "bootstrap_interval", "verdict", "claim_verdict", "add_paired", "paired_frame", "plot_paired"]

HOLDS, CONTRADICTED, UNDECIDED = "holds", "contradicted", "undecided"
#: How the plots draw each verdict's interval.
VERDICT_COLORS = {HOLDS: "C2", CONTRADICTED: "C3", UNDECIDED: "0.4"}

#: Where a run's pairing partner must agree with it (the seed pairs them).
PAIR_KEYS = ("dataset", "backbone", "setting")
#: A mark :func:`~mmrepro.report.tables.load_runs` appends to a method's name (e.g. " [target labels]").
_MARK = re.compile(r" \[[^\]]*\]$")


@dataclass(frozen=True)
class Bootstrap:
    """How an interval is drawn: confidence level, number of resamples of the seeds, generator seed."""

    level: float = 0.95
    resamples: int = 10_000
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.level < 1:
            raise ValueError(f"bootstrap level must be in (0, 1), got {self.level}")
        if self.resamples < 1:
            raise ValueError(f"bootstrap resamples must be at least 1, got {self.resamples}")

    def describe(self) -> str:
        return (f"{100 * self.level:g} % percentile bootstrap interval of the mean paired difference: "
                f"{self.resamples:,} resamples of the seeds with replacement (NumPy generator seed {self.seed})")


@dataclass(frozen=True)
class Interval:
    """Mean paired difference (method - rival, in the metric's units) over ``n`` seeds and its interval."""

    mean: float
    low: float
    high: float
    n: int

    def text(self, digits: int = 3) -> str:
        if self.n == 0:
            return "no paired seeds"
        return f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def base_method(name: str) -> str:
    """A method's config name without the mark the run loader adds to its display name."""
    return _MARK.sub("", name)


def paired_differences(runs: pd.DataFrame, method: str, rival: str, metric: str, split: str = HEADLINE) -> pd.DataFrame:
    """Per seed, ``method``'s value minus ``rival``'s on the same dataset, backbone, setting and seed.

    ``runs`` is the long frame of :func:`~mmrepro.report.tables.load_runs`; ``split`` a split name or
    the runs' headline (:func:`~mmrepro.report.tables.split_rows`); methods are matched by their
    config names (a display mark such as " [target labels]" is ignored). Columns: the
    :data:`PAIR_KEYS`, ``seed`` and ``diff``; only seeds both ran (with a finite value) are kept.
    """
    df = split_rows(runs, split)
    df = df[df["metric"] == metric]
    names = df["method"].map(base_method)
    keys = [*PAIR_KEYS, "seed"]
    ours = df[names == method].set_index(keys)["value"]
    theirs = df[names == rival].set_index(keys)["value"]
    for who, side in ((method, ours), (rival, theirs)):
        if side.index.duplicated().any():
            raise ValueError(f"method {who!r} has several runs per {keys} in split {split!r}; filter the runs first")
    joined = pd.concat({"ours": ours, "theirs": theirs}, axis=1, join="inner").dropna()
    out = (joined["ours"] - joined["theirs"]).rename("diff").reset_index()
    return out.sort_values(keys, ignore_index=True)


def bootstrap_interval(diffs: Iterable[float], bootstrap: Bootstrap = Bootstrap()) -> Interval:
    """The mean of ``diffs`` and its percentile bootstrap interval over the seeds (see the module doc).

    All resamples are drawn at once as a ``(resamples, n)`` array of indices, the same draws as
    ``resamples`` successive ``integers(0, n, n)`` calls of one generator.
    """
    x = np.asarray(list(diffs), dtype=float)
    if len(x) == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    if not np.isfinite(x).all():
        raise ValueError(f"paired differences must be finite, got {x.tolist()}")
    rng = np.random.default_rng(bootstrap.seed)
    means = x[rng.integers(0, len(x), size=(bootstrap.resamples, len(x)))].mean(axis=1)
    tail = (1 - bootstrap.level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Interval(float(x.mean()), float(low), float(high), len(x))


def verdict(interval: Interval, metric: str) -> str:
    """The rule fixed before measuring: the interval of method - rival excludes zero in the method's
    favour (below zero for a lower-is-better metric) -> holds; against it -> contradicted; else undecided."""
    if interval.n == 0:
        return UNDECIDED
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    low, high = sorted((sign * interval.low, sign * interval.high))
    if low > 0:
        return HOLDS
    if high < 0:
        return CONTRADICTED
    return UNDECIDED


def claim_verdict(verdicts: Iterable[str]) -> str:
    """A claim made of several comparisons: holds if all hold, contradicted if any is, else undecided."""
    verdicts = list(verdicts)
    if not verdicts:
        return UNDECIDED
    if CONTRADICTED in verdicts:
        return CONTRADICTED
    return HOLDS if all(v == HOLDS for v in verdicts) else UNDECIDED


def paired_frame(runs: pd.DataFrame, reference: str, split: str = HEADLINE,
                 bootstrap: Bootstrap = Bootstrap()) -> pd.DataFrame:
    """Every other method against ``reference`` on each dataset's main metric: one row per (dataset,
    backbone, setting, method) with ``metric, n, mean, low, high, verdict``; empty without a reference run."""
    df = split_rows(runs, split)
    names = df["method"].map(base_method)
    rows = []
    if (names == reference).any():
        for (ds, bb, sett), g in df.groupby(list(PAIR_KEYS), sort=False):
            gnames = g["method"].map(base_method)
            if not (gnames == reference).any():
                continue
            metric = MAIN_METRIC.get(g["task"].iloc[0])
            for label, method in dict(zip(g["method"], gnames)).items():
                if method == reference or metric is None:
                    continue
                diffs = paired_differences(g, method, reference, metric, split)["diff"]
                iv = bootstrap_interval(diffs, bootstrap)
                rows.append({"dataset": ds, "backbone": bb, "setting": sett, "method": label, "metric": metric,
                             "n": iv.n, "mean": iv.mean, "low": iv.low, "high": iv.high,
                             "verdict": verdict(iv, metric)})
    return pd.DataFrame(rows, columns=["dataset", "backbone", "setting", "method", "metric", "n", "mean", "low",
                                       "high", "verdict"])


def add_paired(summary: pd.DataFrame, runs: pd.DataFrame, reference: str | None,
               bootstrap: Bootstrap = Bootstrap()) -> pd.DataFrame:
    """A copy of ``summary`` with ``<m>_paired``, ``<m>_paired_low``, ``<m>_paired_high`` after the main
    metric ``m``'s other columns (its difference to ``reference`` on the same seeds, :func:`paired_frame`;
    the table's paired column, :data:`~mmrepro.report.render.KINDS`) and ``attrs["paired"]`` naming the
    reference and the interval; unchanged without a reference or its runs."""
    if reference is None:
        return summary
    frame = paired_frame(runs, reference, summary.attrs.get("split", HEADLINE), bootstrap)
    if frame.empty:
        return summary
    keys = ["dataset", "backbone", "setting", "method"]
    out = summary.copy()
    for metric, rows in frame.groupby("metric", sort=False):
        keyed = rows.set_index(keys)
        last = max(i for i, c in enumerate(out.columns) if c.startswith(f"{metric}_"))
        for j, (suffix, col) in enumerate((("paired", "mean"), ("paired_low", "low"), ("paired_high", "high"))):
            out.insert(last + 1 + j, f"{metric}_{suffix}",
                       [keyed[col].get(k, math.nan) for k in zip(*(out[c] for c in keys))])
    out.attrs.update(summary.attrs)
    out.attrs["paired"] = {"reference": reference, "metric": ", ".join(dict.fromkeys(frame["metric"])),
                           "level": bootstrap.level, "interval": bootstrap.describe()}
    return out


def plot_paired(runs: pd.DataFrame, reference: str, stem: str | os.PathLike, split: str = HEADLINE,
                bootstrap: Bootstrap = Bootstrap()) -> list[Path]:
    """``stem.png`` and ``stem.pdf``: per (dataset, backbone, setting) panel, one interval per method
    (mean paired difference to ``reference``) and a zero line. Nothing to compare (no run of
    ``reference`` beside another method's) is an error, not a blank figure: the workflow plans the
    plot only where there is (:func:`mmrepro.config.paired_planned`)."""
    frame = paired_frame(runs, reference, split, bootstrap)
    if frame.empty:
        raise ValueError(f"no paired comparison to plot: no run of the reference method {reference!r} shares a "
                         f"dataset, backbone and setting with another method's runs")
    panels = list(frame.groupby(list(PAIR_KEYS), sort=False))
    height = max(len(g) for _, g in panels)
    fig = Figure(figsize=(4.2 * len(panels), 1.4 + 0.35 * height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, ((ds, bb, sett), g) in zip(axes, panels):
        y = np.arange(len(g))[::-1]
        metric = g["metric"].iloc[0]
        scale = unit_of(metric)
        for yi, r in zip(y, g.itertuples(index=False)):
            ax.errorbar([scale * r.mean], [yi], xerr=[[scale * (r.mean - r.low)], [scale * (r.high - r.mean)]],
                        fmt="o", color=VERDICT_COLORS[r.verdict], ms=4, capsize=3)
        ax.axvline(0.0, color="0.2", linewidth=1)
        ax.set_yticks(y)
        ax.set_yticklabels(g["method"])
        ax.set_xlabel(f"{header_of(metric)}: method − {reference}")
        ax.set_title(" / ".join(str(v) for v in (ds, bb, sett) if v), fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    what = "Headline" if split == HEADLINE else f"{split} split"
    fig.suptitle(f"{what}: paired difference to {reference} per seed, mean and {100 * bootstrap.level:g} % "
                 "bootstrap interval over seeds", fontsize=10)
    return save(fig, stem)
