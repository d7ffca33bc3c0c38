"""Plot a study: headline metric per (method, setting), one panel per dataset.

Uses :class:`matplotlib.figure.Figure` with an Agg canvas directly, so pyplot's
global state (current backend, open figures) is never touched.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .figures import legend_columns, save
from .render import LOWER_IS_BETTER, header_of, unit_of
from .tables import CASES_MEAN, HEADLINE, MAIN_METRIC, backbone_labels, split_rows, summarize

__all__ = ["plot_study", "study_figure", "axis_label"]

def axis_label(metric: str) -> str:
    """Axis label with unit and direction, e.g. ``"MAE (lower is better)"``, ``"Acc-2 % (higher is better)"``."""
    direction = "lower" if metric in LOWER_IS_BETTER else "higher"
    return f"{header_of(metric, direction=False)} ({direction} is better)"


def plot_study(runs: pd.DataFrame, stem: str | os.PathLike, split: str = HEADLINE,
               metric: str | None = None) -> list[Path]:
    """Write ``stem.png`` and ``stem.pdf`` of :func:`study_figure` (fitted to its canvas); returns the two paths."""
    return save(study_figure(runs, split, metric), stem)


def study_figure(runs: pd.DataFrame, split: str = HEADLINE, metric: str | None = None) -> Figure:
    """Mean ± std over seeds of one metric, each run's headline by default (the tables' numbers).

    One panel per dataset (sorted); settings on the x axis as categories (order
    of first appearance), methods (``<backbone>/<method>`` where the runs mix
    backbones) as dodged points with std error bars (no bar
    when a group has a single seed), the oracle as a dashed line labelled
    "oracle" where the runs carry one. ``metric`` defaults per dataset to the
    task's main metric (regression: mae, classification: acc).
    """
    df = backbone_labels(split_rows(runs, split))
    if df.empty:
        raise ValueError(f"no runs for split {split!r}")
    datasets = sorted(pd.unique(df["dataset"]))
    methods = list(pd.unique(df["method"]))
    settings = list(pd.unique(df["setting"]))
    x_of = {s: i for i, s in enumerate(settings)}
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    markers = "osD^vP*Xh<>"
    k = len(methods)
    step = min(0.18, 0.7 / max(k, 1))
    offset = {m: (i - (k - 1) / 2) * step for i, m in enumerate(methods)}

    rotate = len(settings) > 4 or max(len(str(s)) for s in settings) > 8
    panel_w = max(3.6, 1.2 + 0.9 * len(settings))
    fig = Figure(figsize=(panel_w * len(datasets), 3.6 + (0.5 if rotate else 0)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(datasets), squeeze=False)[0]

    used_methods: list[str] = []
    any_oracle = False
    ns: set[int] = set()
    for ax, ds in zip(axes, datasets):
        sub = df[df["dataset"] == ds]
        task = sub["task"].iloc[0]
        m = metric if metric is not None else MAIN_METRIC.get(task)
        if m is None:
            raise ValueError(f"dataset {ds!r}: no main metric for task {task!r}; pass metric=")
        summ = summarize(sub, split=split, metrics=[m])
        scale = unit_of(m)  # the tables' unit
        ns.update(int(n) for n in summ["n"])
        for meth, g in summ.groupby("method", sort=False):
            xs = np.array([x_of[s] for s in g["setting"]], dtype=float) + offset[meth]
            yerr = scale * g[f"{m}_std"].fillna(0.0).to_numpy()
            ax.errorbar(xs, scale * g[f"{m}_mean"].to_numpy(), yerr=yerr, fmt=markers[methods.index(meth) % len(markers)],
                        color=colors[meth], ms=6, capsize=3, elinewidth=1.2, linestyle="none")
            if meth not in used_methods:
                used_methods.append(meth)
        # Oracle: one line if constant over the panel, else a segment per setting.
        ora = summ.dropna(subset=[f"{m}_oracle"])
        if not ora.empty:
            any_oracle = True
            values = scale * ora[f"{m}_oracle"].to_numpy()
            ax.update_datalim([(0.0, v) for v in values])  # the oracle stays in view
            if np.allclose(values, values[0]):
                ax.axhline(values[0], color="0.3", linestyle="--", linewidth=1.2, zorder=0)
            else:
                for (sett, val) in ora[["setting", f"{m}_oracle"]].drop_duplicates().itertuples(index=False):
                    x = x_of[sett]
                    ax.hlines(scale * val, x - 0.45, x + 0.45, color="0.3", linestyle="--", linewidth=1.2, zorder=0)
        ax.set_title(f"{ds} ({task})", fontsize=10)
        ax.set_ylabel(axis_label(m))
        ax.set_xlabel("setting")
        ax.set_xticks(range(len(settings)))
        ax.set_xticklabels([str(s) for s in settings], rotation=30 if rotate else 0,
                           ha="right" if rotate else "center")
        ax.set_xlim(-0.6, len(settings) - 0.4)
        ax.grid(axis="y", alpha=0.3)

    handles = [Line2D([], [], color=colors[mm], marker=markers[methods.index(mm) % len(markers)],
                      linestyle="none", label=mm) for mm in used_methods]
    if any_oracle:
        handles.append(Line2D([], [], color="0.3", linestyle="--", label="oracle"))
    labels = [h.get_label() for h in handles]
    fig.legend(handles=handles, loc="outside lower center", frameon=False, fontsize=8,
               ncol=legend_columns(labels, fig.get_figwidth()))
    studies = ", ".join(map(str, pd.unique(df["study"])))
    n_txt = f"n = {min(ns)}" if len(ns) == 1 else f"n = {min(ns)}-{max(ns)}"
    cases = split == HEADLINE and (df["split"] == CASES_MEAN).any()
    plain = f"{'test' if split == HEADLINE else split} split"
    what = "headline (mean over the available-set test cases)" if cases else plain
    fig.suptitle(f"{studies}: {what}, mean ± std over seeds ({n_txt})", fontsize=10)
    return fig
