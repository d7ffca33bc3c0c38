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
  is better, for regression; accuracy for classification; mean Dice for segmentation) against rho (runs at the reference
  lambda) and against lambda (runs at the reference rho), mean over seeds. The reference values are
  the plain ``cggm`` run's; sweeps come from ``config/grids/balance_cggm_sweeps.yaml``.

Each dataset of the study gets its own tables and row of Figure 5 (a run is compared only with runs
of its dataset). Every cell is mean ± std over seeds in the study tables' units (accuracies in %), the best of each
column in bold; rows without runs and metrics equal in every cell are left out and named in the notes.
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

from .figures import save
from .render import LOWER_IS_BETTER, MAIN_METRIC, Cell, Row, Table, Unit, header_of, mark_best, markdown, wrap
from .tables import DEFAULT_METRICS, _atomic_write_text, _with_suffix

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


def _values(values: list[float | None]) -> list[float]:
    """A cell's per-run values, the missing ones left out."""
    return [float(v) for v in values if v is not None and np.isfinite(v)]


def _at_best_epoch(run: dict, key: str) -> float | None:
    best = run.get("best_epoch") or (run["history"][-1]["epoch"] if run["history"] else None)
    return next((h.get(key) for h in run["history"] if h.get("epoch") == best), None)


def table5(runs: list[dict]) -> pd.DataFrame:
    """Rows unimodal / joint / joint + CGGM, one column per modality: each cell the validation
    accuracies of its runs (one per seed)."""
    complete = [r for r in runs if r["spec"].data_setting.type == "complete"]
    names = sorted({k[len("util_"):] for r in complete for h in r["history"] for k in h if k.startswith("util_")}
                   | {m for r in runs if r["spec"].data_setting.type == "subset"
                      for m in r["spec"].data_setting.params.get("modalities", [])})
    rows = {"unimodal": {}, "joint": {}, "joint + CGGM": {}}
    for m in names:
        uni = [r for r in runs if r["spec"].data_setting.type == "subset" and r["method"] == "joint"
               and r["spec"].data_setting.params.get("modalities") == [m]]
        acc = "acc2_has0" if any("acc2_has0" in r["metrics"]["valid"] for r in uni) else "acc"
        rows["unimodal"][m] = _values([r["metrics"]["valid"].get(acc) for r in uni])
        rows["joint"][m] = _values([_at_best_epoch(r, f"util_{m}") for r in complete if r["method"] == "joint"])
        rows["joint + CGGM"][m] = _values([_at_best_epoch(r, f"util_{m}") for r in complete if r["method"] == "cggm"])
    return pd.DataFrame.from_dict(rows, orient="index", columns=names)


def _reference(runs: list[dict]) -> dict:
    """rho, lam and magnitude of the plain ``cggm`` run (the defaults if there is none)."""
    ref = next((_cggm_params(r) for r in runs if r["method"] == "cggm"), None)
    return ref or dict(CGGM_DEFAULTS)


def table6(runs: list[dict]) -> pd.DataFrame:
    """Rows joint / magnitude only / direction only / both; columns: the task's test metrics (the
    study table's, in its order), each cell the values of its runs (one per seed)."""
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
    present = {k for rs in groups.values() for r in rs for k in r["metrics"]["test"]}
    order = [m for task in dict.fromkeys(r.get("task") for r in complete) for m in DEFAULT_METRICS.get(task, ())]
    metrics = [m for m in dict.fromkeys(order) if m in present] or sorted(present)
    return pd.DataFrame.from_dict({name: {k: _values([r["metrics"]["test"].get(k) for r in rs]) for k in metrics}
                                   for name, rs in groups.items()}, orient="index", columns=metrics)


def as_table(frame: pd.DataFrame, title: str, metric_of: dict[str, str]) -> Table:
    """A Table 5 or 6 frame for the writers: mean±std over its runs in each metric's unit
    (``metric_of``: column -> metric), the best row of each column in bold; rows without a run and
    columns equal to an earlier one in every cell left out, both said in the notes."""
    frame = frame.copy()
    empty = [name for name, row in frame.iterrows() if not any(len(v) for v in row)]
    same = [(c, earlier) for i, c in enumerate(frame.columns) for earlier in frame.columns[:i]
            if all(a == b for a, b in zip(frame[c], frame[earlier]))]
    dropped = list(dict.fromkeys(c for c, _ in same))
    frame = frame.drop(index=empty, columns=dropped)
    counts = sorted({len(v) for col in frame.columns for v in frame[col] if len(v)})
    columns = []
    for col in frame.columns:
        unit = Unit.of(metric_of[col])
        cells = {name: Cell(_mean_std(v, unit)) for name, v in frame[col].items()}
        means = {name: float(np.mean(v)) for name, v in frame[col].items() if len(v)}
        columns.append(mark_best(cells, means, metric_of[col], unit))
    rows = tuple(Row((str(name),), tuple(c[name] for c in columns)) for name in frame.index)
    notes = [f"Mean±std over {'/'.join(map(str, counts)) or 'no'} run(s) per cell (one per seed); bold: the best "
             "of its column (↓ lower is better)."]
    if empty:
        notes.append(f"No runs for {', '.join(empty)}: the grids in config/grids/ add them (docs/studies.md).")
    if dropped:
        notes.append("Shown once, equal in every cell: " + "; ".join(f"{c} = {e}" for c, e in same if c in dropped
                                                                  and e not in dropped) + ".")
    header = tuple(header_of(c) if metric_of[c] == c else f"{c}: {header_of(metric_of[c])}" for c in frame.columns)
    return Table(title, ("",), (), header, (rows,), tuple(notes))


def _mean_std(values: list[float], unit: Unit) -> str:
    if not values:
        return ""
    return unit.num(float(np.mean(values))) + (f"±{unit.num(float(np.std(values, ddof=1)))}" if len(values) > 1 else "")


def _main_metric(runs: list[dict]) -> tuple[str, float]:
    """(metric, sign) of one dataset's runs: improvement = sign * (variant - joint)."""
    test = next((r["metrics"]["test"] for r in runs), {})
    metric = next((m for m in dict.fromkeys(MAIN_METRIC.values()) if m in test), "acc")
    return metric, -1.0 if metric in LOWER_IS_BETTER else 1.0


def by_dataset(runs: list[dict]) -> dict[str, list[dict]]:
    """The runs of each dataset, in the order the datasets first appear: every table and sweep compares
    runs of one dataset only."""
    out: dict[str, list[dict]] = {}
    for r in runs:
        out.setdefault(r["spec"].dataset, []).append(r)
    return out


def _sweep_points(runs: list[dict]) -> dict[str, list[tuple[dict, float]]]:
    """Per axis (rho, lam): the complete-data CGGM runs at the reference value of the other axis
    (magnitude on) whose seed has a joint run, with their value on the axis. ``runs`` need
    ``method``, ``seed`` and ``spec`` only."""
    complete = [r for r in runs if r["spec"].data_setting.type == "complete"]
    joint = {r["seed"] for r in complete if r["method"] == "joint"}
    ref = _reference(runs)
    out: dict[str, list[tuple[dict, float]]] = {}
    for axis, other in (("rho", "lam"), ("lam", "rho")):
        params = [(r, _cggm_params(r)) for r in complete]
        out[axis] = [(r, p[axis]) for r, p in params
                     if p is not None and p["magnitude"] and p[other] == ref[other] and r["seed"] in joint]
    return out


def planned_figure5(specs: list[RunSpec]) -> bool:
    """Whether runs of these run specs give Figure 5 a point: what the workflow asks
    :func:`write_cggm_report` for (never a blank figure)."""
    runs = by_dataset([{"method": s.method, "seed": s.seed, "spec": s} for s in specs])
    return any(any(_sweep_points(rs).values()) for rs in runs.values())


def sweeps(runs: list[dict]) -> dict[str, pd.DataFrame]:
    """Improvement over joint (mean, std, n over seeds) against rho and against lambda: runs of one
    dataset (:func:`by_dataset`)."""
    complete = [r for r in runs if r["spec"].data_setting.type == "complete"]
    metric, sign = _main_metric(complete)
    joint = {r["seed"]: r["metrics"]["test"][metric] for r in complete if r["method"] == "joint"}
    out = {}
    for axis, points in _sweep_points(runs).items():
        rows = [{axis: x, "gain": sign * (r["metrics"]["test"][metric] - joint[r["seed"]])} for r, x in points]
        frame = pd.DataFrame(rows, columns=[axis, "gain"])
        out[axis] = frame.groupby(axis)["gain"].agg(["mean", "std", "count"]).reset_index()
    return out


def _markdown(frame: pd.DataFrame) -> str:
    cols = ["", *map(str, frame.columns)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join([str(i), *map(str, row)]) + " |" for i, row in zip(frame.index, frame.astype(object).to_numpy())]
    return "\n".join(lines)


def write_cggm_report(runs: list[dict], table: str | os.PathLike, plot: str | os.PathLike) -> list[Path]:
    """``table.md`` (Tables 5 and 6 and the sweep numbers, per dataset) and ``plot.{png,pdf}`` (Figure 5,
    a row per dataset that has a point: :func:`figure5`); returns the paths written."""
    text = ["# CGGM paper tables from the balance runs", ""]
    panels = {}
    for dataset, runs_of in by_dataset(runs).items():
        sw = sweeps(runs_of)
        metric, sign = _main_metric([r for r in runs_of if r["spec"].data_setting.type == "complete"])
        gain = f"{'joint - CGGM' if sign < 0 else 'CGGM - joint'} test {metric}"
        panels[dataset] = (sw, gain)
        text += [f"## {dataset}", "", *_dataset_sections(runs_of, sw, gain)]
    table_path = _with_suffix(Path(table), ".md")
    _atomic_write_text(table_path, "\n".join(text))
    fig = figure5(panels)
    if fig is None:
        print(f"no Figure 5 point (no CGGM run beside joint training): {plot}.png not written")
        return [table_path]
    return [table_path, *save(fig, plot)]


def _dataset_sections(runs: list[dict], sw: dict[str, pd.DataFrame], gain: str) -> list[str]:
    """One dataset's Tables 5 and 6 and sweep numbers, as Markdown lines."""
    t5, t6 = table5(runs), table6(runs)
    acc = "acc" if any(r.get("task") == "classification" for r in runs) else "acc2_has0"
    text = ["### Table 5: accuracy of each modality's unimodal classifier (validation split)", ""]
    if len(t5.columns):
        text += [wrap("unimodal: the run on that modality alone; joint and joint + CGGM: the unimodal classifier on "
                      "the model's encoder at the best epoch (utilisation probe / CGGM's classifier). Columns: "
                      "modalities."), "", markdown(as_table(t5, "", {m: acc for m in t5.columns}))]
    else:
        text += ["(no one-modality run and no per-modality probe on this dataset)", ""]
    text += ["### Table 6: ablation (test split)", "", markdown(as_table(t6, "", {m: m for m in t6.columns})),
             f"### Figure 5: improvement over joint training ({gain}; positive = better)", ""]
    for axis, frame in sw.items():
        shown = frame.assign(count=frame["count"].astype(int)).set_index(axis).round(4)
        text += [f"#### against {axis}", "", _markdown(shown) if len(frame) else "(no sweep runs)", ""]
    return text


def figure5(panels: dict[str, tuple[dict[str, pd.DataFrame], str]]) -> Figure | None:
    """CGGM's Figure 5: per dataset (``panels``: dataset -> (:func:`sweeps`, its gain's words)) a row
    with one panel per swept axis that has points (ticks at the swept values), the gain (mean ± std
    over seeds) against it; None where no dataset has a point."""
    shown = {d: ({a: f for a, f in sw.items() if len(f)}, gain) for d, (sw, gain) in panels.items()}
    shown = {d: v for d, v in shown.items() if v[0]}
    if not shown:
        return None
    cols = max(len(sw) for sw, _ in shown.values())
    fig = Figure(figsize=(4.2 * cols, 3.4 * len(shown) + 0.4), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.subplots(len(shown), cols, squeeze=False)
    for row, (dataset, (sw, gain)) in zip(grid, shown.items()):
        for ax, (axis, frame) in zip(row, sw.items()):
            ax.errorbar(frame[axis], frame["mean"], yerr=frame["std"].fillna(0.0), marker="o", capsize=3)
            ax.axhline(0.0, color="grey", lw=0.8)
            ax.set_xticks(frame[axis].to_numpy(), [f"{x:g}" for x in frame[axis]])
            ax.set_xlabel({"rho": "rho", "lam": "lambda"}[axis])
            ax.set_ylabel(f"improvement ({gain})", fontsize=9)
            ax.set_title(dataset, fontsize=9)
            ax.grid(alpha=0.3)
        for ax in row[len(sw):]:
            ax.set_visible(False)
    fig.suptitle("CGGM's Figure 5: improvement over joint training, mean ± std over seeds", fontsize=10)
    return fig
