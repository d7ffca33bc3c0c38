"""The CGGM paper's extra tables and its Figure 5, from the balance study's own runs.

- **Table 5** (per-modality classifier accuracy under unimodal training, joint training and joint
  training + CGGM): "unimodal" is the validation accuracy of the run that trains that modality
  alone (a one-modality ``subset`` setting with ``joint``); "joint" and "joint + CGGM" are the
  validation accuracy of the unimodal classifier on that modality's encoder at the run's best
  epoch (``util_<m>`` in ``history.json``: the utilisation probe beside joint training, CGGM's own
  classifier beside CGGM). Regression tasks count sign agreement (the probes' accuracy) and the
  unimodal runs' ``acc2_has0``. All on the validation split, the one the probes are measured on.
- **Table 6** (ablation): the test metrics of joint training, magnitude only (a ``cggm`` variant
  with ``lam = 0``), direction only (``magnitude = false``) and both (the plain ``cggm`` runs); the
  variants are found by their resolved parameters (``config.json``), whatever they are called.
- **Figure 5**: the improvement of CGGM over joint training in the main metric (test MAE, lower
  is better, for regression; accuracy for classification) against rho (runs at the reference
  lambda) and against lambda (runs at the reference rho), mean over seeds. The reference values are
  the plain ``cggm`` run's; sweeps come from ``config/grids/balance_cggm_sweeps.yaml``.

Every cell is mean +/- std over seeds and says how many runs it averages.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mmrepro.spec import RunSpec

from .tables import _atomic_write, _atomic_write_text, _with_suffix

CGGM_DEFAULTS = {"rho": 1.3, "lam": 0.2, "magnitude": True}


def load_balance_runs(metrics_paths: list[str | os.PathLike]) -> list[dict]:
    """Each run's metrics.json with its resolved spec (config.json) and history (history.json)."""
    runs = []
    for path in map(Path, metrics_paths):
        run = json.loads(path.read_text())
        run["spec"] = RunSpec.from_json(path.with_name("config.json").read_text())
        run["history"] = json.loads(path.with_name("history.json").read_text())
        runs.append(run)
    return runs


def _cggm_params(run: dict) -> dict | None:
    plan = run["spec"].plan
    if plan.hook != "cggm" or plan.transform != "full_finetune":
        return None
    return {**CGGM_DEFAULTS, **run["spec"].method_params.get("cggm", {})}


def _cell(values: list[float]) -> str:
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return "-"
    sd = f" ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else ""
    return f"{np.mean(values):.3f}{sd} (n={len(values)})"


def _at_best_epoch(run: dict, key: str) -> float | None:
    best = run.get("best_epoch") or (run["history"][-1]["epoch"] if run["history"] else None)
    return next((h.get(key) for h in run["history"] if h.get("epoch") == best), None)


def table5(runs: list[dict]) -> pd.DataFrame:
    """Rows unimodal / joint / joint + CGGM, one column per modality (validation accuracy)."""
    complete = [r for r in runs if r["spec"].data_setting.type == "complete"]
    names = sorted({k[len("util_"):] for r in complete for h in r["history"] for k in h if k.startswith("util_")}
                   | {m for r in runs if r["spec"].data_setting.type == "subset"
                      for m in r["spec"].data_setting.params.get("modalities", [])})
    rows = {"unimodal": {}, "joint": {}, "joint + CGGM": {}}
    for m in names:
        uni = [r for r in runs if r["spec"].data_setting.type == "subset" and r["method"] == "joint"
               and r["spec"].data_setting.params.get("modalities") == [m]]
        acc = "acc2_has0" if any("acc2_has0" in r["metrics"]["valid"] for r in uni) else "acc"
        rows["unimodal"][m] = _cell([r["metrics"]["valid"].get(acc) for r in uni])
        rows["joint"][m] = _cell([_at_best_epoch(r, f"util_{m}") for r in complete if r["method"] == "joint"])
        rows["joint + CGGM"][m] = _cell([_at_best_epoch(r, f"util_{m}") for r in complete if r["method"] == "cggm"])
    return pd.DataFrame.from_dict(rows, orient="index", columns=names)


def _reference(runs: list[dict]) -> dict:
    """rho, lam and magnitude of the plain ``cggm`` run (the defaults if there is none)."""
    ref = next((_cggm_params(r) for r in runs if r["method"] == "cggm"), None)
    return ref or dict(CGGM_DEFAULTS)


def table6(runs: list[dict]) -> pd.DataFrame:
    """Rows joint / magnitude only / direction only / both; columns: the test metrics."""
    complete = [r for r in runs if r["spec"].data_setting.type == "complete"]
    groups = {"joint": [r for r in complete if r["method"] == "joint"],
              "magnitude only (lambda 0)": [], "direction only (no magnitude)": [],
              "both (CGGM)": [r for r in complete if r["method"] == "cggm"]}
    for r in complete:
        p = _cggm_params(r)
        if p is None or r["method"] == "cggm":
            continue
        if p["magnitude"] and p["lam"] == 0:
            groups["magnitude only (lambda 0)"].append(r)
        elif not p["magnitude"] and p["lam"] > 0:
            groups["direction only (no magnitude)"].append(r)
    metrics = sorted({k for rs in groups.values() for r in rs for k in r["metrics"]["test"]})
    return pd.DataFrame.from_dict({name: {k: _cell([r["metrics"]["test"].get(k) for r in rs]) for k in metrics}
                                   for name, rs in groups.items()}, orient="index", columns=metrics)


def _main_metric(runs: list[dict]) -> tuple[str, float]:
    """(metric, sign): improvement = sign * (variant - joint)."""
    test = next((r["metrics"]["test"] for r in runs), {})
    return ("mae", -1.0) if "mae" in test else ("acc", 1.0)


def sweeps(runs: list[dict]) -> dict[str, pd.DataFrame]:
    """Improvement over joint (mean, std, n over seeds) against rho and against lambda."""
    complete = [r for r in runs if r["spec"].data_setting.type == "complete"]
    metric, sign = _main_metric(complete)
    joint = {r["seed"]: r["metrics"]["test"][metric] for r in complete if r["method"] == "joint"}
    ref = _reference(runs)
    out = {}
    for axis, other in (("rho", "lam"), ("lam", "rho")):
        rows = []
        for r in complete:
            p = _cggm_params(r)
            if p is None or not p["magnitude"] or p[other] != ref[other] or r["seed"] not in joint:
                continue
            rows.append({axis: p[axis], "gain": sign * (r["metrics"]["test"][metric] - joint[r["seed"]])})
        frame = pd.DataFrame(rows, columns=[axis, "gain"])
        out[axis] = frame.groupby(axis)["gain"].agg(["mean", "std", "count"]).reset_index()
    return out


def _markdown(frame: pd.DataFrame) -> str:
    cols = ["", *map(str, frame.columns)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join([str(i), *map(str, row)]) + " |" for i, row in zip(frame.index, frame.astype(object).to_numpy())]
    return "\n".join(lines)


def write_cggm_report(runs: list[dict], table: str | os.PathLike, plot: str | os.PathLike) -> list[Path]:
    """``table.md`` (Tables 5 and 6, and the sweep numbers) and ``plot.{png,pdf}`` (Figure 5)."""
    t5, t6, sw = table5(runs), table6(runs), sweeps(runs)
    metric, sign = _main_metric([r for r in runs if r["spec"].data_setting.type == "complete"])
    gain = f"{'joint - CGGM' if sign < 0 else 'CGGM - joint'} test {metric}"
    text = ["# CGGM paper tables from the balance runs", "",
            "## Table 5: accuracy of each modality's unimodal classifier (validation split)", "",
            "unimodal: the run on that modality alone; joint and joint + CGGM: the unimodal classifier on the "
            "model's encoder at the best epoch (utilisation probe / CGGM's classifier). mean ± std (n seeds).", "",
            _markdown(t5), "", "## Table 6: ablation (test split)", "", _markdown(t6), "",
            f"## Figure 5: improvement over joint training ({gain}; positive = better)", ""]
    for axis, frame in sw.items():
        shown = frame.assign(count=frame["count"].astype(int)).set_index(axis).round(4)
        text += [f"### against {axis}", "", _markdown(shown) if len(frame) else "(no sweep runs)", ""]
    table_path = _with_suffix(Path(table), ".md")
    _atomic_write_text(table_path, "\n".join(text))
    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (axis, frame) in zip(fig.subplots(1, 2), sw.items()):
        if len(frame):
            ax.errorbar(frame[axis], frame["mean"], yerr=frame["std"].fillna(0.0), marker="o", capsize=3)
        else:
            ax.text(0.5, 0.5, "no sweep runs", ha="center", va="center", transform=ax.transAxes)
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xlabel({"rho": "rho", "lam": "lambda"}[axis])
        ax.set_ylabel(f"improvement ({gain})")
        ax.grid(alpha=0.3)
    fig.suptitle("CGGM's Figure 5: improvement over joint training, mean ± std over seeds", fontsize=10)
    paths = [table_path, _with_suffix(Path(plot), ".png"), _with_suffix(Path(plot), ".pdf")]
    for path, fmt in zip(paths[1:], ("png", "pdf")):
        _atomic_write(path, lambda fh, fmt=fmt: fig.savefig(fh, format=fmt, dpi=150))
    return paths
