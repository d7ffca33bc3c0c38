"""The missing study's own outputs: MPLMM's Table 1 layout and its curves (test rate, training rate, prompt length).

Why a separate report: the generic table has one column per metric on the plain test split; the
missing study scores each run on one test case per available set (``test:available:<set>``),
their mean (``test:avg``) and a sweep of test missing rates (``test:rate:<r>``), all written by
the runs into ``metrics.json``. Here:

- :func:`case_table`: one row per (dataset, method, case, metric): mean and sample std over
  seeds, seed count, and the method's trainable parameters and their share of all parameters.
  A lower-bound run (``available`` setting) holds one case, the set it was trained on; its
  ``avg`` is the mean of the per-set models, seed by seed, like the paper's LB row. The Table 3
  ablation rows are the ``mplmm_<letters>`` methods. Report groups (:mod:`.groups`, e.g. IEMOCAP's
  four emotion tasks) are datasets of their own here, their values averaged over the members
  within each seed; a cell where some seed lacks a member is ``incomplete`` (no mean). With the
  paper's numbers (names.yaml maps its conditions to our case names, modality order aside), each
  cell gets the paper's value beside it.
- :func:`write_case_table`: that frame as CSV, and as Markdown in the paper's layout (methods x
  available sets + Avg, one block per dataset and metric, a "(paper)" row under each method the
  paper reports, in its units, provenance marks as footnotes).
- :func:`plot_curves`: the task's main metric against one x, from the points of :data:`CURVES`: the
  test missing rate (each run's ``test:rate:<r>`` cases), the training missing rate (``test:avg`` of
  runs of ``missing`` settings at different rates; MPLMM's Fig. 6) and the prompt length
  (``test:avg`` of runs whose transform has a ``prompt_length``, e.g. ``method_variants`` of
  ``mplmm``; Fig. 7). Training rate and prompt length are read from each run's ``config.json``.

Metrics shown (:data:`CASE_METRICS`): ACC/F1 of the binary task for every dataset (regression:
the non-zero Acc-2 and F1), plus MAE, Corr and Acc-7 for MOSI-style regression.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mmrepro.spec import RunSpec

from .groups import INCOMPLETE, add_groups, parse_groups
from .plots import metric_label
from .reference import Reference, reference_frame
from .tables import (MAIN_METRIC, Footnotes, _atomic_write, _atomic_write_text, _decimals, _with_suffix, group_notes,
                     load_runs)

__all__ = ["CASE_METRICS", "CURVES", "case_table", "write_case_table", "plot_curves", "test_rate_points",
           "train_rate_points", "prompt_length_points", "missing_report"]

CASE_METRICS: dict[str, tuple[str, ...]] = {
    "regression": ("acc2_non0", "f1_non0", "mae", "corr", "acc7"),
    "sims_regression": ("acc2", "f1", "mae", "corr"),
    "classification": ("acc", "f1_weighted"),
}
CASE_PREFIX, AVG, RATE_PREFIX = "test:available:", "test:avg", "test:rate:"


def _totals(paths: pd.Series) -> dict[str, int]:
    return {p: int(json.loads(Path(p).read_text())["total_params"]) for p in pd.unique(paths)}


def case_table(runs: pd.DataFrame, reference: Reference | pd.DataFrame | None = None) -> pd.DataFrame:
    """Long frame ``dataset, method, case, metric, mean, std, n, incomplete, trainable_params, trainable_share``.

    ``incomplete``: a report group's cell (``runs.attrs["groups"]``, see
    :func:`~mmrepro.report.groups.add_groups`) where some seed lacks a member's value; its mean and
    std are NaN then. With ``reference`` (the study's paper numbers, settings named as cases), the
    columns ``paper, paper_printed, paper_note, scale`` follow, for the datasets of ``runs``; a
    paper cell we did not run is a row with ``n == 0``.
    """
    groups = runs.attrs.get("groups", {})
    df = runs[runs["split"].str.startswith(CASE_PREFIX)].copy()
    if df.empty:
        raise ValueError("no test:available:<set> cases in these runs (is the setting 'missing' or 'available'?)")
    df["case"] = df["split"].str.removeprefix(CASE_PREFIX)
    df = df[[m in CASE_METRICS.get(t, ()) for t, m in zip(df["task"], df["metric"])]]
    df["incomplete"] = df["value"].isna() & df["dataset"].isin(groups)
    stats = {"value": ("value", "mean"), "incomplete": ("incomplete", "any")}
    # one value per (dataset, method, case, metric, seed): a case comes from one run of the seed
    per_seed = df.groupby(["dataset", "method", "case", "metric", "seed"], sort=False).agg(**stats).reset_index()
    avg = per_seed.groupby(["dataset", "method", "metric", "seed"], sort=False).agg(**stats).reset_index()
    avg["case"] = "avg"
    both = pd.concat([per_seed, avg[per_seed.columns]], ignore_index=True)
    out = both.groupby(["dataset", "method", "case", "metric"], sort=False).agg(
        mean=("value", "mean"), std=("value", lambda v: v.std(ddof=1) if len(v) > 1 else np.nan),
        n=("seed", "count"), incomplete=("incomplete", "any")).reset_index()
    out.loc[out["incomplete"], ["mean", "std"]] = np.nan
    totals = _totals(runs["path"])
    params = runs.groupby(["dataset", "method"], sort=False).agg(
        trainable_params=("trainable_params", "first"), path=("path", "first")).reset_index()
    params["trainable_share"] = params["trainable_params"] / params["path"].map(totals)
    out = out.merge(params.drop(columns="path"), on=["dataset", "method"], how="left")
    if reference is not None:
        out = _with_paper(out, reference)
    out.attrs.update(groups=groups, paper=getattr(reference, "paper", ""))
    return out


def _case_key(case: str) -> str:
    """A case's modality set, order aside (``text.audio`` and ``audio.text`` are one case)."""
    return ".".join(sorted(case.split(".")))


def _with_paper(table: pd.DataFrame, reference: Reference | pd.DataFrame) -> pd.DataFrame:
    """``table`` with the paper's value of each (dataset, method, case, metric) beside ours."""
    keys = ["dataset", "method", "key", "metric"]
    ref = reference_frame(reference)
    ref = ref[ref["dataset"].isin(set(table["dataset"]))].rename(
        columns={"value": "paper", "printed": "paper_printed", "footnote": "paper_note"})
    ref = ref.assign(key=ref["setting"].map(_case_key))
    ours = table.assign(key=table["case"].map(_case_key))
    merged = ours.merge(ref[[*keys, "paper", "paper_printed", "paper_note", "scale"]], on=keys, how="left")
    only = ref.merge(ours[keys], on=keys, how="left", indicator=True).query("_merge == 'left_only'")
    names = dict(zip(zip(ours["dataset"], ours["key"]), ours["case"]))  # our case name for the paper's set
    only = only.assign(case=[names.get((d, k), s) for d, k, s in zip(only["dataset"], only["key"], only["setting"])],
                       n=0, incomplete=False)
    return pd.concat([merged, only[[c for c in merged.columns if c in only.columns]]],
                     ignore_index=True).drop(columns="key")


def _markdown(table: pd.DataFrame, digits: int = 3) -> str:
    lines = ["Mean ± sample std over seeds, per available test set and their mean (Avg); "
             "trainable parameters and their share of the model.", ""]
    has_paper = "paper" in table.columns and table["paper"].notna().any()
    if has_paper:
        lines += [f"(paper): {table.attrs.get('paper') or 'the paper'}, values as printed, in the paper's units "
                  "(ours shown in them too: % where the block's title says so).", ""]
    lines += [line for note in group_notes(table.attrs.get("groups", {})) for line in (f"{note}.", "")]
    footnotes = Footnotes()
    for (dataset, metric), g in table.groupby(["dataset", "metric"], sort=False):
        cases = [c for c in pd.unique(g["case"]) if c != "avg"] + ["avg"]
        paper = g[g["paper"].notna()] if has_paper else g.iloc[:0]
        scale = float(paper["scale"].max()) if len(paper) else 1.0
        dec = _decimals(paper["paper_printed"], 2) if len(paper) else digits
        lines += [f"### {dataset}: {metric}" + (" (%)" if scale == 100 else ""), "",
                  "| method | " + " | ".join(cases) + " | trainable (share) |",
                  "|---" * (len(cases) + 2) + "|"]
        for method, rows in g.groupby("method", sort=False):
            ran = rows[rows["n"] > 0]
            if len(ran):
                cell = {r.case: INCOMPLETE if r.incomplete else (
                    f"{r.mean * scale:.{dec}f}" + ("" if np.isnan(r.std) else f" ± {r.std * scale:.{dec}f}"))
                    for r in ran.itertuples()}
                first = ran.iloc[0]
                lines.append(f"| {method} | " + " | ".join(cell.get(c, "") for c in cases)
                             + f" | {int(first.trainable_params):,} ({first.trainable_share:.1%}) |")
            printed = {r.case: r.paper_printed + footnotes(r.paper_note)
                       for r in rows.itertuples() if has_paper and not pd.isna(r.paper)}
            if printed:
                lines.append(f"| {method} (paper) | " + " | ".join(printed.get(c, "") for c in cases) + " |  |")
        lines.append("")
    lines += [f"{mk} {text}" for mk, text in footnotes.items()]
    return "\n".join(lines) + "\n"


def write_case_table(table: pd.DataFrame, stem: str | os.PathLike) -> list[Path]:
    """Write ``stem.csv`` (the long frame) and ``stem.md`` (the paper's layout)."""
    stem = Path(stem)
    csv, md = _with_suffix(stem, ".csv"), _with_suffix(stem, ".md")
    _atomic_write_text(csv, table.to_csv(index=False))
    _atomic_write_text(md, _markdown(table))
    return [csv, md]


def _spec(path: str) -> RunSpec:
    """The run's spec, ``config.json`` beside its ``metrics.json``."""
    return RunSpec.from_json((Path(path).parent / "config.json").read_text())


def _prompt_length(spec: RunSpec) -> float:
    """The run's prompt length (its transform's ``prompt_length``, the class default if not set); NaN if none."""
    from mmrepro.methods.registry import TRANSFORMS

    name = spec.plan.transform
    param = inspect.signature(TRANSFORMS.get(name)).parameters.get("prompt_length")
    return float(spec.method_params[name].get("prompt_length", param.default)) if param is not None else np.nan


def test_rate_points(runs: pd.DataFrame) -> pd.DataFrame:
    """Curve points over the test missing rate: every run's ``test:rate:<r>`` splits, one line per method."""
    df = runs[runs["split"].str.startswith(RATE_PREFIX)]
    return df.assign(x=df["split"].str.removeprefix(RATE_PREFIX).astype(float), line=df["method"])


def train_rate_points(runs: pd.DataFrame) -> pd.DataFrame:
    """Curve points over the training missing rate: ``test:avg`` of each ``missing``-setting run, one line
    per method."""
    df = runs[runs["split"] == AVG]
    specs = {p: _spec(p) for p in pd.unique(df["path"])}
    rate = df["path"].map(lambda p: specs[p].data_setting.params.get("rate", 0.7)
                          if specs[p].data_setting.type == "missing" else np.nan)
    return df.assign(x=rate, line=df["method"]).dropna(subset=["x"])


def prompt_length_points(runs: pd.DataFrame) -> pd.DataFrame:
    """Curve points over the prompt length: ``test:avg`` of runs whose transform has one (MPLMM, MPMM,
    their variants), one line per (transform, setting)."""
    df = runs[runs["split"] == AVG]
    specs = {p: _spec(p) for p in pd.unique(df["path"])}
    length = df["path"].map(lambda p: _prompt_length(specs[p]))
    line = df["path"].map(lambda p: specs[p].plan.transform) + " (" + df["setting"] + ")"
    return df.assign(x=length, line=line).dropna(subset=["x"])


def plot_curves(points: pd.DataFrame, stem: str | os.PathLike, xlabel: str) -> list[Path]:
    """Write ``stem.png``/``.pdf``: the main metric (mean ± std over seeds) against ``x``, one panel per
    dataset, one line per ``line`` with at least two x values (a single point is no curve)."""
    df = points[points["line"].map(points.groupby("line")["x"].nunique()) > 1] if len(points) else points
    datasets = sorted(pd.unique(df["dataset"]))
    fig = Figure(figsize=(5 * max(len(datasets), 1), 4))
    FigureCanvasAgg(fig)
    if df.empty:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, f"no runs at more than one {xlabel}", ha="center", va="center")
        ax.set_axis_off()
    for i, dataset in enumerate(datasets):
        ax = fig.add_subplot(1, len(datasets), i + 1)
        d = df[df["dataset"] == dataset]
        metric = MAIN_METRIC[d["task"].iloc[0]]
        for line, g in d[d["metric"] == metric].groupby("line", sort=False):
            stats = g.groupby("x")["value"].agg(["mean", "std"]).sort_index()
            ax.errorbar(stats.index, stats["mean"], yerr=stats["std"].fillna(0.0), marker="o", capsize=3, label=line)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric_label(metric))
        ax.set_title(dataset)
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths = []
    for ext in (".png", ".pdf"):
        path = _with_suffix(Path(stem), ext)
        _atomic_write(path, lambda fh, e=ext: fig.savefig(fh, format=e[1:]))
        paths.append(path)
    return paths


CURVES = {"test": (test_rate_points, "test missing rate"), "train": (train_rate_points, "training missing rate"),
          "prompt": (prompt_length_points, "prompt length")}
"""The study's curves: name -> (points of the runs, x-axis label)."""


def missing_report(metrics: list[Path], table: Path, plots: dict[str, Path], reference: Reference | None = None,
                   groups: dict[str, list[str]] | None = None) -> None:
    """The CLI's ``missing-report``: the table (with the paper's numbers and the study's report
    groups) and each curve of :data:`CURVES` named in ``plots`` (curve name -> output stem) from the
    runs' ``metrics.json`` files. The curves show the datasets as run (no groups)."""
    runs = load_runs(metrics)
    write_case_table(case_table(add_groups(runs, parse_groups(groups)), reference), table)
    for name, stem in plots.items():
        points, xlabel = CURVES[name]
        plot_curves(points(runs), stem, xlabel)
