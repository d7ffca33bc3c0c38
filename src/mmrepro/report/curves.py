"""Per-epoch curves of a study from its runs' ``history.json`` files (never from MLflow).

The balance study's figure: each modality's utilisation (its unimodal probe's validation
accuracy, ``util_<modality>``) and the modulation coefficients over epochs, one line per
(method, modality), mean over seeds (runs stopped early contribute to the epochs they ran).
Panels are drawn only for the families that some run logged; a family logged per epoch and per
batch (the shift study's offline and online adapters) gets one panel per x axis.

CGGM's coefficients are shown by their per-epoch median (``coeff_median_<modality>``) on a symlog
axis, beside the share of steps whose coefficient exploded or was clamped
(``coeff_extreme_share``): their epoch means (``coeff_<modality>``) are dominated by a few steps of
size up to ~1e5 and are left out of the plain coefficient panel for runs that log medians. That
panel (linear axis) keeps the other methods' bounded coefficients (OGM-GE's, for example).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from .figures import legend_columns, save
from .tables import backbone_labels

FAMILIES = {"util_": "unimodal probe accuracy (validation)", "coeff_median_": "median coefficient (symlog)",
            "coeff_extreme_share": "share of steps with exploded / clamped coefficient",
            "coeff_": "modulation coefficient (epoch mean)", "valid_loss": "validation loss",
            "target_error": "target test error along adaptation"}
SYMLOG = {"coeff_median_"}
#: What a history entry counts: an epoch (training, offline adaptation) or a batch (online adaptation);
#: each has its own x axis.
STEPS = ("epoch", "batch")


def family_of(key: str) -> str | None:
    """The first family whose prefix ``key`` starts with (more specific prefixes come first)."""
    return next((f for f in FAMILIES if key.startswith(f)), None)


def load_histories(metrics_paths: list[str | os.PathLike]) -> pd.DataFrame:
    """Long frame (backbone, method, setting, seed, per, step, key, value) from the history.json beside
    each metrics.json; ``per`` says what an entry counts (``epoch``: training and offline adaptation,
    ``batch``: online adaptation) and ``step`` its number."""
    rows = []
    for path in map(Path, metrics_paths):
        meta = json.loads(path.read_text())
        history_path = path.with_name("history.json")
        try:
            history = json.loads(history_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{history_path}: cannot read the run's history ({e})") from None
        for entry in history:
            per = next((s for s in STEPS if s in entry), None)
            if per is None:
                continue
            for key, value in entry.items():
                if key not in STEPS:
                    rows.append({"backbone": meta.get("backbone", ""), "method": meta["method"],
                                 "setting": str(meta["setting"]), "seed": meta["seed"], "per": per,
                                 "step": entry[per], "key": key, "value": float(value)})
    return pd.DataFrame(rows, columns=["backbone", "method", "setting", "seed", "per", "step", "key", "value"])


def panels(histories: pd.DataFrame) -> list[tuple[str, str]]:
    """The (curve family, step kind) panels drawn, in order: those some run logged (the plain
    coefficient panel only for runs without medians), each family once per kind of step it was
    logged at (per epoch, per batch: never on one axis), else the validation loss per epoch."""
    has_median = histories.groupby(["method", "setting"])["key"].transform(
        lambda k: k.str.startswith("coeff_median_").any()).astype(bool)
    present = {(family_of(k), p) for k, p in zip(histories["key"][~has_median], histories["per"][~has_median])}
    present |= {(family_of(k), p) for k, p in zip(histories["key"][has_median], histories["per"][has_median])
                if family_of(k) != "coeff_"}
    return [(f, p) for f in FAMILIES for p in STEPS if (f, p) in present] or [("valid_loss", "epoch")]


def plot_curves(histories: pd.DataFrame, stem: str | os.PathLike) -> list[Path]:
    """Write ``stem.png`` and ``stem.pdf`` of :func:`curves_figure` (fitted to its canvas)."""
    return save(curves_figure(histories), stem)


_STYLES = ["-", "--", ":", "-.", (0, (5, 1)), (0, (1, 1))]


def curves_figure(histories: pd.DataFrame) -> Figure:
    """One panel per (family, step kind) of :func:`panels`, mean over seeds per step. A run's colour
    says its method and setting (``<backbone>/<method>`` where the runs mix backbones), the line
    style the family's member (a modality); one legend below the panels has an entry per colour and
    per style (not one per line)."""
    histories = backbone_labels(histories)
    shown = panels(histories)
    fig = Figure(figsize=(4.8 * len(shown), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(shown), squeeze=False)[0]
    runs = list(pd.unique(histories["method"] + "/" + histories["setting"]))
    colors = {name: f"C{i % 10}" for i, name in enumerate(runs)}
    members = sorted({k[len(f):] for f, _ in shown for k in pd.unique(histories["key"]) if family_of(k) == f and k != f})
    styles = {m: _STYLES[i % len(_STYLES)] for i, m in enumerate(members)}
    used_runs: list[str] = []
    for ax, (family, per) in zip(axes, shown):
        h = histories[histories["per"] == per]
        keys = sorted(k for k in pd.unique(h["key"]) if family_of(k) == family)
        for (method, setting), g in h.groupby(["method", "setting"], sort=False):
            if family == "coeff_" and g["key"].str.startswith("coeff_median_").any():
                continue  # this run's coefficients are drawn by their median
            for key in keys:
                curve = g[g["key"] == key].groupby("step")["value"].mean()
                if curve.empty:
                    continue
                run = f"{method}/{setting}"
                ax.plot(curve.index, curve.to_numpy(), color=colors[run], linestyle=styles.get(key[len(family):], "-"),
                        marker="o" if len(curve) < 30 else None, markersize=3)
                if run not in used_runs:
                    used_runs.append(run)
        if family in SYMLOG:
            ax.set_yscale("symlog", linthresh=1.0)
        ax.set_xlabel(per)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(FAMILIES[family], fontsize=9)
        if len({p for _, p in shown}) > 1:
            ax.set_title(f"per {per}", fontsize=9)
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=colors[r], label=r) for r in used_runs]
    if len(members) > 1:
        handles += [Line2D([], [], color="0.3", linestyle=styles[m], label=m) for m in members]
    fig.legend(handles=handles, loc="outside lower center", fontsize=8, frameon=False, title_fontsize=8,
               title="colour: method/setting" + (", line style: modality" if len(members) > 1 else ""),
               ncol=legend_columns([h.get_label() for h in handles], fig.get_figwidth()))
    steps = " and ".join(f"per {p}" for p in dict.fromkeys(p for _, p in shown))
    fig.suptitle(f"curves {steps}, mean over seeds", fontsize=10)
    return fig


__all__ = ["load_histories", "panels", "plot_curves", "curves_figure"]
