"""The mechanisms report: per study, the diagnostic and each method's gain against the dose.

Reads the JSON points :func:`mmrepro.mechanisms.run_point` writes (one per study, dose and seed)
and writes one figure per study (two panels: the diagnostic with its threshold, and each method's
gain over the study's baseline; mean +/- std over seeds) and one table of the diagnostics. Points
that record trainable parameters (peft) get a third panel: each method's gain at the sweep's
largest dose against its trainable parameters.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .figures import save
from .tables import _atomic_write_text, _with_suffix

GAIN_LABEL = {"balance": "gain over joint training", "peft": "share of the (full FT - linear probe) gap closed",
              "missing": "gain over joint training at the same rate", "shift": "gain over the source model"}
DOSE_LABEL = {"balance": "synth.shortcut_private", "peft": "synth.interaction_transfer",
              "missing": "missing rate", "shift": "target domain scale"}


def load_points(paths: list[str | os.PathLike]) -> pd.DataFrame:
    """Long frame: study, dose, seed, key (``diagnostic``, ``baseline`` or ``gain:<method>``), value,
    threshold, metric, trainable (the method's trainable parameters where the point records them).
    A gain of ``None`` (no gap to close) reads as NaN and is left out of means and plots."""
    rows = []
    nan = float("nan")
    for path in map(Path, paths):
        p = json.loads(path.read_text())
        base = {"study": p["study"], "dose": float(p["dose"]), "seed": int(p["seed"]), "metric": p["metric"]}
        rows.append({**base, "key": "diagnostic", "value": p["diagnostic"]["value"],
                     "threshold": p["diagnostic"]["threshold"], "trainable": nan})
        rows.append({**base, "key": "baseline", "value": p["baseline"], "threshold": nan, "trainable": nan})
        counts = p.get("trainable", {})
        rows += [{**base, "key": f"gain:{m}", "value": nan if g is None else g, "threshold": nan,
                  "trainable": counts.get(m, nan)} for m, g in p["gains"].items()]
    return pd.DataFrame(rows, columns=["study", "dose", "seed", "metric", "key", "value", "threshold", "trainable"])


def diagnostics_table(points: pd.DataFrame, stem: str | os.PathLike) -> list[Path]:
    """``stem.md`` and ``stem.csv``: per study and dose, the diagnostic (mean, std, n) against its threshold."""
    diag = points[points["key"] == "diagnostic"]
    base = points[points["key"] == "baseline"].groupby(["study", "dose"])["value"].mean()
    g = diag.groupby(["study", "dose"], sort=True)
    present = (diag["value"] >= diag["threshold"]).groupby([diag["study"], diag["dose"]]).mean()
    table = pd.DataFrame({"n": g["seed"].nunique(), "diagnostic_mean": g["value"].mean(),
                          "diagnostic_std": g["value"].std(), "threshold": g["threshold"].first(),
                          "present_share": present, "baseline_mean": base}).reset_index()
    lines = ["| study | dose | n | diagnostic | threshold | present in (share of seeds) | baseline |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in table.itertuples(index=False):
        std = "" if pd.isna(r.diagnostic_std) else f" ± {r.diagnostic_std:.3f}"
        lines.append(f"| {r.study} | {r.dose:g} | {r.n} | {r.diagnostic_mean:.3f}{std} | {r.threshold:.2f} | "
                     f"{r.present_share:.2f} | {r.baseline_mean:.3f} |")
    lines += ["", "Diagnostic: see mmrepro.mechanisms (thresholds fixed before measuring); mean ± sample std "
              "over seeds. Baseline: the study's reference model's main metric at that dose.", ""]
    stem = Path(stem)
    paths = [_with_suffix(stem, ".md"), _with_suffix(stem, ".csv")]
    buf = io.StringIO()
    table.to_csv(buf, index=False)
    _atomic_write_text(paths[0], "\n".join(lines))
    _atomic_write_text(paths[1], buf.getvalue())
    return paths


def plot_mechanism(points: pd.DataFrame, study: str, stem: str | os.PathLike) -> list[Path]:
    """``stem.png`` and ``stem.pdf`` for one study: diagnostic vs dose, and each method's gain vs dose."""
    sub = points[points["study"] == study]
    if sub.empty:
        raise ValueError(f"no mechanism points for study {study!r}")
    gain_keys = sorted(k for k in sub["key"].unique() if k.startswith("gain:"))
    by_params = sub[sub["key"].isin(gain_keys)]["trainable"].notna().any()
    fig = Figure(figsize=(15 if by_params else 10, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3 if by_params else 2)
    ax_diag, ax_gain = axes[:2]
    seeds = sub["seed"].nunique()
    gain_label = f"{GAIN_LABEL[study]} ({sub['metric'].iloc[0]})"
    for ax, keys, ylabel in ((ax_diag, ["diagnostic"], "diagnostic"), (ax_gain, gain_keys, gain_label)):
        for i, key in enumerate(keys):
            g = sub[sub["key"] == key].groupby("dose")["value"]
            mean, std = g.mean(), g.std().fillna(0.0)
            ax.errorbar(mean.index, mean.to_numpy(), yerr=std.to_numpy(), marker="os^vD"[i % 5], capsize=3,
                        color=f"C{i % 10}", label=key.removeprefix("gain:"))
        ax.set_xlabel(f"dose: {DOSE_LABEL[study]}")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if not keys:
            ax.text(0.5, 0.5, "no methods in this sweep", ha="center", va="center", transform=ax.transAxes)
    if by_params:
        _plot_by_params(axes[2], sub, gain_keys, gain_label)
    ax_diag.axhline(sub["threshold"].dropna().iloc[0], color="0.3", linestyle="--", label="threshold")
    ax_gain.axhline(0.0, color="0.6", linewidth=0.8)
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"{study} on synth: mean ± std over {seeds} seed(s)", fontsize=11)
    return save(fig, stem)


def _plot_by_params(ax, sub: pd.DataFrame, keys: list[str], ylabel: str) -> None:
    """Each method's gain (mean +/- std over seeds) at the sweep's largest dose against its trainable parameters."""
    dose = sub["dose"].max()
    for i, key in enumerate(keys):
        rows = sub[(sub["key"] == key) & (sub["dose"] == dose)]
        std = rows["value"].std()
        ax.errorbar([rows["trainable"].mean()], [rows["value"].mean()], yerr=[0.0 if pd.isna(std) else std],
                    marker="os^vD"[i % 5], capsize=3, color=f"C{i % 10}", linestyle="none",
                    label=key.removeprefix("gain:"))
    ax.set_xscale("log")
    ax.set_xlabel(f"trainable parameters (dose {dose:g})")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.axhline(0.0, color="0.6", linewidth=0.8)


__all__ = ["load_points", "diagnostics_table", "plot_mechanism"]
