"""Per-epoch curves of a study from its runs' ``history.json`` files (never from MLflow).

The balance study's figure: each modality's utilisation (its unimodal probe's validation
accuracy, ``util_<modality>``) and the modulation coefficients over epochs, one line per
(method, modality), mean over seeds (runs stopped early contribute to the epochs they ran).
Panels are drawn only for the families that some run logged.

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

from .tables import _atomic_write, _with_suffix, backbone_labels

FAMILIES = {"util_": "unimodal probe accuracy (validation)", "coeff_median_": "median coefficient (symlog)",
            "coeff_extreme_share": "share of steps with exploded / clamped coefficient",
            "coeff_": "modulation coefficient (epoch mean)", "valid_loss": "validation loss",
            "target_error": "target test error along adaptation (x: epoch offline, batch online)"}
SYMLOG = {"coeff_median_"}
#: The step of a history entry: an epoch (training, offline adaptation) or a batch (online adaptation).
STEPS = ("epoch", "batch")


def family_of(key: str) -> str | None:
    """The first family whose prefix ``key`` starts with (more specific prefixes come first)."""
    return next((f for f in FAMILIES if key.startswith(f)), None)


def load_histories(metrics_paths: list[str | os.PathLike]) -> pd.DataFrame:
    """Long frame (backbone, method, setting, seed, epoch, key, value) from the history.json beside each
    metrics.json; ``epoch`` holds the entry's step (its ``epoch``, else its ``batch``)."""
    rows = []
    for path in map(Path, metrics_paths):
        meta = json.loads(path.read_text())
        history_path = path.with_name("history.json")
        try:
            history = json.loads(history_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{history_path}: cannot read the run's history ({e})") from None
        for entry in history:
            step = next((entry[s] for s in STEPS if s in entry), None)
            if step is None:
                continue
            for key, value in entry.items():
                if key not in STEPS:
                    rows.append({"backbone": meta.get("backbone", ""), "method": meta["method"],
                                 "setting": str(meta["setting"]), "seed": meta["seed"], "epoch": step, "key": key,
                                 "value": float(value)})
    return pd.DataFrame(rows, columns=["backbone", "method", "setting", "seed", "epoch", "key", "value"])


def panels(histories: pd.DataFrame) -> list[str]:
    """The curve families drawn, in order: those some run logged (the plain coefficient panel only
    for runs without medians), else the validation loss."""
    has_median = histories.groupby(["method", "setting"])["key"].transform(
        lambda k: k.str.startswith("coeff_median_").any())
    present = {family_of(k) for k in pd.unique(histories["key"][~has_median.astype(bool)])}
    present |= {family_of(k) for k in pd.unique(histories["key"][has_median.astype(bool)])} - {"coeff_"}
    return [f for f in FAMILIES if f in present] or ["valid_loss"]


def plot_curves(histories: pd.DataFrame, stem: str | os.PathLike) -> list[Path]:
    """Write ``stem.png`` and ``stem.pdf``: one panel per curve family present, one line per method
    and setting (``<backbone>/<method>`` where the runs mix backbones)."""
    histories = backbone_labels(histories)
    families = panels(histories)
    fig = Figure(figsize=(5.5 * len(families), 6.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(families), squeeze=False)[0]
    groups = list(histories.groupby(["method", "setting"], sort=False))
    colors = {name: f"C{i % 10}" for i, name in enumerate(pd.unique(histories["method"] + "/" + histories["setting"]))}
    for ax, family in zip(axes, families):
        keys = sorted(k for k in pd.unique(histories["key"]) if family_of(k) == family)
        styles = {k: ls for k, ls in zip(keys, ["-", "--", ":", "-.", (0, (5, 1)), (0, (1, 1))] * 4)}
        for (method, setting), g in groups:
            if family == "coeff_" and g["key"].str.startswith("coeff_median_").any():
                continue  # this run's coefficients are drawn by their median
            for key in keys:
                curve = g[g["key"] == key].groupby("epoch")["value"].mean()
                if curve.empty:
                    continue
                label = f"{method}/{setting}" + (f" {key[len(family):]}" if key != family else "")
                ax.plot(curve.index, curve.to_numpy(), color=colors[f"{method}/{setting}"], linestyle=styles[key],
                        marker="o", markersize=3, label=label)
        if family in SYMLOG:
            ax.set_yscale("symlog", linthresh=1.0)
        ax.set_xlabel("epoch")
        ax.set_ylabel(FAMILIES[family])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    fig.suptitle("per-epoch curves, mean over seeds", fontsize=11)
    paths = [_with_suffix(Path(stem), ".png"), _with_suffix(Path(stem), ".pdf")]
    for path, fmt in zip(paths, ("png", "pdf")):
        _atomic_write(path, lambda fh, fmt=fmt: fig.savefig(fh, format=fmt, dpi=150))
    return paths


__all__ = ["load_histories", "panels", "plot_curves"]
