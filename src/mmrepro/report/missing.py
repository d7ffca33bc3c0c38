"""The missing study's own outputs: MPLMM's Table 1 layout and its curves (test rate, training rate, prompt length).

Why a separate report: the generic table shows one headline per run; the missing study scores
each run on one test case per available set (``test:available:<set>``), their mean (``test:avg``,
the study table's headline) and a sweep of test missing rates (``test:rate:<r>``), all written by
the runs into ``metrics.json``. Here:

- :func:`case_table`: one row per (dataset, method, case, metric): mean and sample std over
  seeds, seed count, and the method's trainable parameters and their share of the backbone (the
  study table's definition). A lower-bound run (``available`` setting) holds one case, the set it
  was trained on; its ``avg`` is the mean of the per-set models, seed by seed, like the paper's LB
  row. The Table 3 ablation rows are the ``mplmm_<letters>`` methods. Report groups
  (:mod:`.groups`, e.g. IEMOCAP's four emotion tasks) are datasets of their own here, their values
  averaged over the members within each seed; a cell where some seed lacks a member is
  ``incomplete`` (no mean). With the paper's numbers (names.yaml maps its conditions to our case
  names, modality order aside), each cell gets the paper's value beside it.
- :func:`write_case_table`: that frame as CSV, and as Markdown and HTML in the paper's layout
  (:func:`case_tables`: methods x available sets + avg, one table per dataset and metric, the
  best per column in bold, a "(paper)" row under each method the paper reports, provenance marks
  as footnotes), every metric in one unit (% for accuracies and F1).
- :func:`curve_figure`: the task's main metric against one x, from the points of :data:`CURVES`:
  the test missing rate (each run's ``test:rate:<r>`` cases: fresh random patterns at each rate,
  so the point at the training rate is not the headline), the training missing rate (``test:avg``
  of runs of ``missing`` settings at different rates; MPLMM's Fig. 6) and the prompt length
  (``test:avg`` of runs whose transform has a ``prompt_length``, e.g. ``method_variants`` of
  ``mplmm``; Fig. 7). Training rate and prompt length are read from each run's ``config.json``;
  :func:`planned_curves` says from the run specs which curves will have a line, and no figure
  is written without one.

Metrics shown (:data:`CASE_METRICS`): ACC/F1 of the binary task for every dataset (regression:
the non-zero Acc-2 and F1), plus MAE, Corr and Acc-7 for MOSI-style regression.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mmrepro.spec import RunSpec

from .figures import save
from .groups import INCOMPLETE, add_groups, parse_groups
from .plots import axis_label
from .reference import Reference, reference_frame
from .render import (SHARE_NOTE, Cell, Footnotes, Row, Table, Unit, group_notes, header_of, html_page,
                     mark_best, markdown, params_text, unit_of, wrap)
from .tables import CASES_MEAN, MAIN_METRIC, _atomic_write_text, _with_suffix, load_runs

__all__ = ["CASE_METRICS", "CURVES", "case_table", "case_tables", "write_case_table", "curve_figure", "planned_curves",
           "test_rate_points", "train_rate_points", "prompt_length_points", "missing_report"]

CASE_METRICS: dict[str, tuple[str, ...]] = {
    "regression": ("acc2_non0", "f1_non0", "mae", "corr", "acc7"),
    "sims_regression": ("acc2", "f1", "mae", "corr"),
    "classification": ("acc", "f1_weighted"),
}
CASE_PREFIX, AVG, RATE_PREFIX = "test:available:", CASES_MEAN, "test:rate:"


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
    params = runs.groupby(["dataset", "method"], sort=False).agg(
        trainable_params=("trainable_params", "first"), backbone_params=("backbone_params", "first")).reset_index()
    params["trainable_share"] = params["trainable_params"] / params["backbone_params"]  # the study table's share
    out = out.merge(params.drop(columns="backbone_params"), on=["dataset", "method"], how="left")
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


def case_tables(table: pd.DataFrame) -> list[Table]:
    """The case table in the paper's layout: per dataset one table of each method's trainable
    parameters, then one per (dataset, metric): methods x available sets + avg, the best of each
    column marked, a "(paper)" row under each method the paper reports (the paper's value as
    printed). Every metric in its one unit (:func:`~mmrepro.report.render.unit_of`)."""
    has_paper = "paper" in table.columns and table["paper"].notna().any()
    footnotes = Footnotes()
    out = []
    for dataset, d in table.groupby("dataset", sort=False):
        ran = d[d["n"] > 0].drop_duplicates("method")
        params = tuple(Row((r.method,), (Cell(params_text(r.trainable_params, r.trainable_share)),))
                       for r in ran.itertuples())
        out.append(Table(f"{dataset}: trainable parameters", ("method",), ((dataset, 1),), ("params",), (params,)))
        for metric, g in d.groupby("metric", sort=False):
            cases = [c for c in pd.unique(g["case"]) if c != "avg"] + ["avg"]
            unit = Unit.of(metric, g["paper_printed"].dropna() if has_paper else ())
            methods = list(pd.unique(g["method"]))
            ours = {(r.method, r.case): r for r in g[g["n"] > 0].itertuples()}
            columns = []
            for case in cases:
                cells = {m: _case_cell(ours.get((m, case)), unit) for m in methods}
                means = {m: ours[(m, case)].mean for m in methods if (m, case) in ours}
                columns.append(mark_best(cells, means, metric, unit))
            rows = []
            for m in methods:
                if any((m, c) in ours for c in cases):
                    rows.append(Row((m,), tuple(col[m] for col in columns)))
                paper = {r.case: Cell(r.paper_printed, footnotes(r.paper_note)) for r in g[g["method"] == m].itertuples()
                         if has_paper and not pd.isna(r.paper)}
                if paper:
                    rows.append(Row((f"{m} (paper)",), tuple(paper.get(c, Cell()) for c in cases)))
            out.append(Table(f"{dataset}: {header_of(metric)}", ("method",), ((dataset, len(cases)),), tuple(cases),
                             (tuple(rows),)))
    if out:
        out[-1] = replace(out[-1], footnotes=tuple(footnotes.items()))
    return out


def _case_cell(r: object, unit: Unit) -> Cell:
    if r is None:
        return Cell()
    if r.incomplete:
        return Cell(INCOMPLETE)
    return Cell(unit.num(r.mean) + ("" if np.isnan(r.std) else f"±{unit.num(r.std)}"))


def _lead(table: pd.DataFrame) -> list[str]:
    """The notes above the case tables: what a cell, avg and params are."""
    lines = ["Mean±std over seeds per available test set and their mean (avg: each set weighted equally, the "
             "study table's headline); bold: the best method of its column (↓ lower is better). " + SHARE_NOTE]
    if "paper" in table.columns and table["paper"].notna().any():
        lines.append(f"(paper): {table.attrs.get('paper') or 'the paper'}, values as printed.")
    return lines + [f"{note}." for note in group_notes(table.attrs.get("groups", {}))]


def write_case_table(table: pd.DataFrame, stem: str | os.PathLike) -> list[Path]:
    """Write ``stem.csv`` (the long frame, our units), ``stem.md`` and ``stem.html`` (the paper's layout)."""
    stem = Path(stem)
    paths = [_with_suffix(stem, ext) for ext in (".csv", ".md", ".html")]
    lead, tables = _lead(table), case_tables(table)
    _atomic_write_text(paths[0], table.to_csv(index=False))
    _atomic_write_text(paths[1], "\n".join([*(line for note in lead for line in (wrap(note), "")),
                                            *(markdown(t, level=3) for t in tables)]))
    _atomic_write_text(paths[2], html_page(tables, lead))
    return paths


def _spec(path: str) -> RunSpec:
    """The run's spec, ``config.json`` beside its ``metrics.json``."""
    return RunSpec.from_json((Path(path).parent / "config.json").read_text())


def _prompt_length(spec: RunSpec) -> float:
    """The run's prompt length (its transform's ``prompt_length``, the class default if not set); NaN if none."""
    from mmrepro.methods.registry import TRANSFORMS

    name = spec.plan.transform
    param = inspect.signature(TRANSFORMS.get(name)).parameters.get("prompt_length")
    return float(spec.method_params[name].get("prompt_length", param.default)) if param is not None else np.nan


def _train_rate(spec: RunSpec) -> float:
    """The run's training missing rate (a ``missing`` setting's ``rate``, its default if not set); NaN otherwise."""
    from mmrepro.methods.registry import SETTINGS

    setting = spec.data_setting
    if setting.type != "missing":
        return np.nan
    default = inspect.signature(SETTINGS.get("missing")).parameters["rate"].default
    return float(setting.params.get("rate", default))


def _prompt_line(transform: str, setting: str) -> str:
    return f"{transform} ({setting})"


def test_rate_points(runs: pd.DataFrame) -> pd.DataFrame:
    """Curve points over the test missing rate: every run's ``test:rate:<r>`` splits, one line per method."""
    df = runs[runs["split"].str.startswith(RATE_PREFIX)]
    return df.assign(x=df["split"].str.removeprefix(RATE_PREFIX).astype(float), line=df["method"])


def train_rate_points(runs: pd.DataFrame) -> pd.DataFrame:
    """Curve points over the training missing rate: ``test:avg`` of each ``missing``-setting run, one line
    per method."""
    df = runs[runs["split"] == AVG]
    specs = {p: _spec(p) for p in pd.unique(df["path"])}
    return df.assign(x=df["path"].map(lambda p: _train_rate(specs[p])), line=df["method"]).dropna(subset=["x"])


def prompt_length_points(runs: pd.DataFrame) -> pd.DataFrame:
    """Curve points over the prompt length: ``test:avg`` of runs whose transform has one (MPLMM, MPMM,
    their variants), one line per (transform, setting)."""
    df = runs[runs["split"] == AVG]
    specs = {p: _spec(p) for p in pd.unique(df["path"])}
    transform = df["path"].map(lambda p: specs[p].plan.transform)
    return df.assign(x=df["path"].map(lambda p: _prompt_length(specs[p])),
                     line=[_prompt_line(t, s) for t, s in zip(transform, df["setting"])]).dropna(subset=["x"])


def _curve_lines(points: pd.DataFrame) -> pd.DataFrame:
    """The points of lines with at least two x values (a single point is no curve)."""
    if points.empty:
        return points
    return points[points["line"].map(points.groupby("line")["x"].nunique()) > 1]


def curve_figure(points: pd.DataFrame, xlabel: str) -> Figure | None:
    """The main metric (mean ± std over seeds, the tables' unit) against ``x``, one panel per dataset,
    one line per ``line`` with at least two x values; None where no line has two."""
    df = _curve_lines(points)
    if df.empty:
        return None
    datasets = sorted(pd.unique(df["dataset"]))
    fig = Figure(figsize=(4.5 * len(datasets), 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, dataset in zip(fig.subplots(1, len(datasets), squeeze=False)[0], datasets):
        d = df[df["dataset"] == dataset]
        metric = MAIN_METRIC[d["task"].iloc[0]]
        scale = unit_of(metric)
        for line, g in d[d["metric"] == metric].groupby("line", sort=False):
            stats = g.groupby("x")["value"].agg(["mean", "std"]).sort_index()
            ax.errorbar(stats.index, scale * stats["mean"], yerr=scale * stats["std"].fillna(0.0), marker="o",
                        capsize=3, label=line)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(axis_label(metric))
        ax.set_title(dataset, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    n = points.groupby(["dataset", "line", "x"])["seed"].nunique()
    fig.suptitle(f"missing study: mean ± std over seeds (n = {n.min()}{f'-{n.max()}' if n.max() > n.min() else ''})",
                 fontsize=10)
    return fig


CURVES = {"test": (test_rate_points, "test missing rate (fresh random patterns per rate; test:rate:<r>)"),
          "train": (train_rate_points, "training missing rate (headline: mean over the available sets)"),
          "prompt": (prompt_length_points, "prompt length (headline: mean over the available sets)")}
"""The study's curves: name -> (points of the runs, x-axis label)."""


def planned_curves(specs: Iterable[RunSpec]) -> list[str]:
    """The curves of :data:`CURVES` that runs of these run specs will give a line of two or more
    points: what the workflow asks :func:`missing_report` for (never a blank figure)."""
    xs: dict[str, dict[str, set[float]]] = {name: {} for name in CURVES}
    for spec in specs:
        if spec.data_setting.type == "missing":
            xs["test"].setdefault(spec.method, set()).update(map(float, spec.data_setting.params.get("test_rates", ())))
        for name, x, line in (("train", _train_rate(spec), spec.method),
                              ("prompt", _prompt_length(spec), _prompt_line(spec.plan.transform, spec.setting))):
            if not np.isnan(x):
                xs[name].setdefault(line, set()).add(x)
    return [name for name, lines in xs.items() if any(len(v) > 1 for v in lines.values())]


def missing_report(metrics: list[Path], table: Path, plots: dict[str, Path], reference: Reference | None = None,
                   groups: dict[str, list[str]] | None = None) -> list[Path]:
    """The CLI's ``missing-report``: the table (with the paper's numbers and the study's report
    groups) and each curve of :data:`CURVES` named in ``plots`` (curve name -> output stem) that has a
    line, from the runs' ``metrics.json`` files. The curves show the datasets as run (no groups).
    Returns the paths written."""
    runs = load_runs(metrics)
    paths = write_case_table(case_table(add_groups(runs, parse_groups(groups)), reference), table)
    for name, stem in plots.items():
        points, xlabel = CURVES[name]
        fig = curve_figure(points(runs), xlabel)
        if fig is None:
            print(f"no line of two or more points over the {xlabel.split(' (')[0]}: {stem}.png not written")
        else:
            paths += save(fig, stem)
    return paths
