"""Read ``metrics.json`` files and turn them into summary tables.

Only the JSON files the pipeline writes are read, so a table can be rebuilt
offline from a results folder alone.

Summary frame layout (what :func:`summarize` returns and :func:`write_table`
expects): identifier columns ``dataset, backbone, method, setting, task, n`` and the
parameter counts ``trainable_params, backbone_params, trainable_share``, then,
per metric ``m`` in order, ``m_mean``, ``m_std``, ``m_oracle`` (the noise-free
latent optimum), ``m_ceiling`` (the best score reachable from the modalities the run
reads, see :mod:`mmrepro.data.synth`) and, for a metric the paper reports (see
:func:`add_reference`), ``m_paper``, ``m_paper_printed``, ``m_paper_note`` and
``m_diff``; a shift study adds ``m_delta`` (vs source only on the same backbone). The CSV keeps
our units (fractions); the Markdown, LaTeX and HTML tables are laid out by
:mod:`mmrepro.report.render` (the papers' layout, one unit per metric).

Two definitions every output shares: a run's *headline* numbers (:data:`HEADLINE`,
:func:`split_rows`) and its *trainable share*, trainable parameters / ``backbone_params`` (the
model before the method's transform; :data:`~mmrepro.report.render.SHARE_NOTE`).
"""

from __future__ import annotations

import io
import json
import math
import numbers
import os
import statistics
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd

from .marking import mark_text
from .reference import Reference, reference_frame
from .render import (HEADLINE_NOTE, LOWER_IS_BETTER, MAIN_METRIC, SHARE_NOTE, group_notes, html_page, latex, markdown,
                     paper_tables, study_table, wrap)

__all__ = [
    "DEFAULT_METRICS",
    "MAIN_METRIC",
    "LOWER_IS_BETTER",
    "RUN_COLUMNS",
    "HEADLINE",
    "load_runs",
    "split_rows",
    "equal_metrics",
    "summarize",
    "add_reference",
    "add_baseline_delta",
    "write_table",
    "write_paper_table",
]

#: Metrics shown by default, per task, in this order.
DEFAULT_METRICS: dict[str, tuple[str, ...]] = {
    "regression": ("mae", "corr", "acc2_has0", "f1_has0", "acc2_non0", "f1_non0", "acc7"),
    "sims_regression": ("mae", "corr", "acc2", "f1", "acc3", "acc5"),
    "classification": ("acc", "f1_weighted"),
    "segmentation": ("dice_et", "dice_tc", "dice_wt", "dice_mean"),
}

#: Columns of the long frame returned by :func:`load_runs`.
RUN_COLUMNS: tuple[str, ...] = (
    "study", "dataset", "method", "setting", "seed", "task", "backbone",
    "split", "metric", "value", "oracle", "ceiling", "trainable_params", "backbone_params", "path",
)
#: Per-split score blocks a metrics.json may carry beside its metrics, one table column each.
_BOUNDS = ("oracle", "ceiling")
_ID_COLUMNS = ("dataset", "backbone", "method", "setting", "task", "n", "trainable_params", "backbone_params",
               "trainable_share")
_STR_KEYS = ("study", "dataset", "method", "task", "backbone")
_REQUIRED_KEYS = (*_STR_KEYS, "setting", "seed", "metrics", "trainable_params")


# --------------------------------------------------------------------------- loading


def _is_number(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_int(x: object) -> bool:
    return _is_number(x) and float(x).is_integer()  # type: ignore[arg-type]


def _metric_block(path: Path, key: str, block: object) -> dict[str, dict[str, float]]:
    """Validate ``{split: {metric: number|null}}`` and return it as floats."""
    if not isinstance(block, dict):
        raise ValueError(f"{path}: key {key!r} must be an object of splits, got {type(block).__name__}")
    out: dict[str, dict[str, float]] = {}
    for split, metrics in block.items():
        if not isinstance(metrics, dict):
            raise ValueError(f"{path}: key '{key}.{split}' must be an object of metrics")
        vals: dict[str, float] = {}
        for name, v in metrics.items():
            if v is None:
                vals[name] = math.nan
            elif _is_number(v):
                vals[name] = float(v)
            else:
                raise ValueError(f"{path}: key '{key}.{split}.{name}' must be a number or null, got {v!r}")
        out[str(split)] = vals
    return out


def _read_one(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 JSON ({e})") from e
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: top level must be a JSON object, got {type(doc).__name__}")
    for key in _REQUIRED_KEYS:
        if key not in doc:
            raise ValueError(f"{path}: missing key {key!r}")
    for key in _STR_KEYS:
        if not isinstance(doc[key], str):
            raise ValueError(f"{path}: key {key!r} must be a string, got {doc[key]!r}")
    setting = doc["setting"]
    if isinstance(setting, bool) or not isinstance(setting, (str, numbers.Real)):
        raise ValueError(f"{path}: key 'setting' must be a string or number, got {setting!r}")
    if not _is_int(doc["seed"]):
        raise ValueError(f"{path}: key 'seed' must be an integer, got {doc['seed']!r}")
    if not _is_int(doc["trainable_params"]):
        raise ValueError(f"{path}: key 'trainable_params' must be an integer, got {doc['trainable_params']!r}")
    backbone = doc.get("backbone_params")  # older runs lack it: no share of the backbone then
    if backbone is not None and not _is_int(backbone):
        raise ValueError(f"{path}: key 'backbone_params' must be an integer, got {backbone!r}")

    metrics = _metric_block(path, "metrics", doc["metrics"])
    bounds = {key: {} if doc.get(key) in (None, {}) else _metric_block(path, key, doc[key]) for key in _BOUNDS}

    # a run that target labels chose anything in (CASP's released-code checkpoints, a search scored on a
    # cross-dataset target: metrics.json's target_labels_used) is marked wherever it is shown
    method = doc["method"] + (" [target labels]" if doc.get("target_labels_used") else "")
    base = {
        "study": doc["study"], "dataset": doc["dataset"], "method": method,
        "setting": str(setting), "seed": int(doc["seed"]), "task": doc["task"],
        "backbone": doc["backbone"],
    }
    rows = []
    for split, vals in metrics.items():
        for name, v in vals.items():
            rows.append({
                **base, "split": split, "metric": name, "value": v,
                **{key: block.get(split, {}).get(name, math.nan) for key, block in bounds.items()},
                "trainable_params": int(doc["trainable_params"]),
                "backbone_params": math.nan if backbone is None else float(backbone), "path": str(path),
            })
    return rows


def load_runs(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> pd.DataFrame:
    """Read ``metrics.json`` files into one long frame (one row per run x split x metric).

    Columns: :data:`RUN_COLUMNS` (``study, dataset, method, setting, seed, task,
    backbone, split, metric, value, oracle, ceiling, trainable_params, backbone_params, path``;
    ``backbone_params``, the parameters of the model before a method's transform, is NaN for
    files without it). ``setting``
    is always a string (a numeric missing rate ``0.3`` becomes ``"0.3"``);
    ``oracle`` (``ceiling``) is NaN where the file has none for that split/metric; a JSON
    ``null`` metric becomes NaN. Row order follows ``paths``.

    Raises ``ValueError`` naming the file (and key) for a file that is not JSON,
    misses a required key or has a value of the wrong type.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    rows: list[dict] = []
    for p in paths:
        rows.extend(_read_one(Path(p)))
    frame = pd.DataFrame(rows, columns=list(RUN_COLUMNS))
    return frame.astype({"seed": "int64", "value": "float64", "oracle": "float64", "ceiling": "float64",
                         "trainable_params": "int64"})


# --------------------------------------------------------------------------- summarizing


def _oracle_of(g: pd.DataFrame, where: str, column: str = "oracle") -> float:
    """The single oracle (or ceiling) value of one (dataset, method, setting, metric) group."""
    ora = g[column].to_numpy(dtype=float) if column in g else np.array([])
    if len(ora) == 0 or np.isnan(ora).all():
        return math.nan
    if np.isnan(ora).any() or not np.allclose(ora, ora[0], rtol=1e-9, atol=1e-12):
        per_seed = ", ".join(f"seed {s}: {o}" for s, o in zip(g["seed"], ora))
        raise ValueError(f"inconsistent {column} across seeds for {where} ({per_seed}); "
                         f"the {column} must not depend on the seed")
    return float(ora[0])


#: The split name that asks for each run's headline rows (:func:`split_rows`).
HEADLINE = "headline"
#: The split holding the mean over a run's available-set test cases (MPLMM's Table 1 "Avg").
CASES_MEAN = "test:avg"
_RUN_KEY = ["study", "dataset", "backbone", "method", "setting", "seed"]


def split_rows(runs: pd.DataFrame, split: str) -> pd.DataFrame:
    """The rows of ``split``; for :data:`HEADLINE`, each run's headline rows (see
    :data:`~mmrepro.report.render.HEADLINE_NOTE`): its :data:`CASES_MEAN` rows where it has them, else
    its ``test`` rows. The headline's oracle is the test split's (the noise-free optimum does not
    depend on what is missing); its ceiling is left out (the cases read other modalities)."""
    if split != HEADLINE:
        return runs[runs["split"] == split]
    test, cases = runs[runs["split"] == "test"], runs[runs["split"] == CASES_MEAN]
    if cases.empty:
        return test
    has_cases = set(map(tuple, cases[_RUN_KEY].to_numpy()))
    keep = [tuple(k) not in has_cases for k in test[_RUN_KEY].to_numpy()]
    oracle = test.set_index([*_RUN_KEY, "metric"])["oracle"]
    oracle = oracle[~oracle.index.duplicated()]
    found = oracle.reindex(pd.MultiIndex.from_frame(cases[[*_RUN_KEY, "metric"]])).to_numpy()
    cases = cases.assign(oracle=cases["oracle"].fillna(pd.Series(found, index=cases.index)), ceiling=math.nan)
    return pd.concat([test[keep], cases]).sort_index(kind="stable")


def equal_metrics(df: pd.DataFrame, metrics: Sequence[str]) -> dict[str, dict[str, str]]:
    """Per dataset, each metric equal to an earlier one of ``metrics`` on every run and seed (value,
    oracle and ceiling; ``acc2_non0`` = ``acc2_has0`` where no test label is 0): {dataset: {metric:
    the earlier one}}. Decided from the values, never from the dataset's name."""
    out: dict[str, dict[str, str]] = {}
    keys = ["backbone", "method", "setting", "seed"]
    for ds, g in df.groupby("dataset", sort=False):
        wide = {f: g.pivot_table(index=keys, columns="metric", values=f, aggfunc="first", dropna=False)
                for f in ("value", "oracle", "ceiling")}
        present = [m for m in metrics if m in wide["value"].columns and wide["value"][m].notna().any()]
        for i, later in enumerate(present):
            for first in present[:i]:
                if first in out.get(ds, {}):
                    continue
                if all(_same(w[first], w[later]) for w in wide.values() if first in w and later in w):
                    out.setdefault(ds, {})[later] = first
                    break
    return out


def _same(a: pd.Series, b: pd.Series) -> bool:
    a, b = a.to_numpy(dtype=float), b.to_numpy(dtype=float)
    return bool((np.isnan(a) == np.isnan(b)).all() and np.allclose(a[~np.isnan(a)], b[~np.isnan(b)], rtol=0, atol=1e-12))


def summarize(
    runs: pd.DataFrame,
    split: str = HEADLINE,
    metrics: Sequence[str] | None = None,
    reference: Reference | pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per (dataset, backbone, method, setting): mean/std over seeds, seed count, oracle, parameters.

    ``runs`` is the frame of :func:`load_runs`; ``split`` a split name or :data:`HEADLINE` (each
    run's headline, :func:`split_rows`). ``metrics`` defaults to
    :data:`DEFAULT_METRICS` of the task(s) present (those found in the data).
    Columns: ``dataset, backbone, method, setting, task, n`` then per metric ``m``:
    ``m_mean``, ``m_std`` (sample std, ddof=1; NaN when n == 1 -- a single seed
    has no spread, and 0.0 would be misleading), ``m_oracle`` and ``m_ceiling`` (NaN when none) and,
    with ``reference``, ``m_paper`` (see :func:`add_reference`). A seed lacking a
    metric (or having NaN) makes that cell's mean NaN rather than silently
    averaging fewer seeds. ``trainable_params`` and ``backbone_params`` are means over
    seeds; ``trainable_share`` = trainable / backbone (NaN when unknown). Rows of report groups
    (:func:`~mmrepro.report.groups.add_groups`) are summarized like any dataset;
    ``attrs["groups"]`` keeps the groups for the notes, ``attrs["incomplete"]`` the (dataset,
    backbone, method, setting, metric) of group cells where a seed lacks a member's value,
    ``attrs["same"]`` the metrics equal to an earlier one on every run (:func:`equal_metrics`),
    ``attrs["cases"]`` whether some headline is a case mean.

    Row order: datasets sorted, then backbones, methods and settings in order of
    first appearance in ``runs``. Raises ``ValueError`` when there is nothing to
    summarize, a requested metric is absent, a (dataset, backbone, method, setting,
    seed) appears twice (e.g. several studies mixed -- filter first), or seeds
    disagree on the oracle.
    """
    missing_cols = set(RUN_COLUMNS) - {"path", "trainable_params", "backbone_params"} - set(runs.columns)
    if missing_cols:
        raise ValueError(f"runs frame lacks columns {sorted(missing_cols)}; use load_runs()")
    df = split_rows(runs, split)
    if df.empty:
        present = sorted(pd.unique(runs["split"])) if len(runs) else []
        raise ValueError(f"no runs for split {split!r} (splits present: {present})")

    present_metrics = set(df["metric"])
    if metrics is None:
        chosen: list[str] = []
        for task in pd.unique(df["task"]):
            if task not in DEFAULT_METRICS:
                raise ValueError(f"no default metrics for task {task!r}; pass metrics=")
            chosen += [m for m in DEFAULT_METRICS[task] if m in present_metrics and m not in chosen]
        if not chosen:
            raise ValueError(f"none of the default metrics found in split {split!r}")
    else:
        chosen = list(dict.fromkeys(metrics))
        absent = [m for m in chosen if m not in present_metrics]
        if absent:
            raise ValueError(f"metrics {absent} not found in split {split!r} "
                             f"(present: {sorted(present_metrics)})")
    df = df[df["metric"].isin(chosen)]

    keys = ["dataset", "backbone", "method", "setting"]
    dup = df.duplicated([*keys, "seed", "metric"], keep=False)
    if dup.any():
        d = df[dup].iloc[0]
        raise ValueError(
            f"run {d['dataset']}/{d['backbone']}/{d['method']}/{d['setting']}/seed {d['seed']} appears more than "
            "once (several studies mixed?); filter runs before summarizing")

    order = {k: {v: i for i, v in enumerate(pd.unique(df[k]))} for k in keys[1:]}
    groups = runs.attrs.get("groups", {})
    rows, incomplete = [], []
    for (ds, bb, meth, sett), g in df.groupby(keys, sort=False):
        tasks = pd.unique(g["task"])
        if len(tasks) > 1:
            raise ValueError(f"{ds}/{meth}/{sett}: runs disagree on task {list(tasks)}")
        seeds = pd.unique(g["seed"])
        n = len(seeds)
        trainable = g["trainable_params"].mean() if "trainable_params" in g else math.nan
        backbone = g["backbone_params"].mean() if "backbone_params" in g else math.nan
        row: dict[str, object] = {"dataset": ds, "backbone": bb, "method": meth, "setting": sett, "task": tasks[0], "n": n,
                                  "trainable_params": trainable, "backbone_params": backbone,
                                  "trainable_share": trainable / backbone if backbone > 0 else math.nan}
        by_metric = dict(tuple(g.groupby("metric", sort=False)))
        for m in chosen:
            gm = by_metric.get(m)
            if gm is None:
                mean = std = ora = ceil = math.nan
            else:
                vals = gm.set_index("seed")["value"].reindex(seeds).to_numpy(dtype=float).tolist()
                if any(math.isnan(v) for v in vals):
                    mean = std = math.nan
                    if ds in groups:
                        incomplete.append((ds, bb, meth, sett, m))
                else:  # statistics: exact-ish (fsum), so constant values give std 0.0
                    mean = statistics.fmean(vals)
                    std = statistics.stdev(vals) if n > 1 else math.nan
                ora = _oracle_of(gm, f"{ds}/{meth}/{sett}/{m}")
                ceil = _oracle_of(gm, f"{ds}/{meth}/{sett}/{m}", "ceiling")
            row[f"{m}_mean"], row[f"{m}_std"], row[f"{m}_oracle"], row[f"{m}_ceiling"] = mean, std, ora, ceil
        rows.append(row)

    rows.sort(key=lambda r: (r["dataset"], *(order[k][r[k]] for k in keys[1:])))
    columns = [*_ID_COLUMNS] + [f"{m}_{s}" for m in chosen for s in ("mean", "std", *_BOUNDS)]
    summary = pd.DataFrame(rows, columns=columns).astype({"n": "int64"})
    summary.attrs.update(metrics=list(chosen), split=split, groups=groups, incomplete=incomplete,
                         same=equal_metrics(df, chosen), study=", ".join(map(str, pd.unique(df["study"]))),
                         cases=bool((df["split"] == CASES_MEAN).any()))
    if reference is not None:
        summary = add_reference(summary, reference)
    return summary


def _summary_metrics(summary: pd.DataFrame) -> list[str]:
    ms = summary.attrs.get("metrics")
    if ms and all(f"{m}_mean" in summary.columns for m in ms):
        return list(ms)
    return [c[: -len("_mean")] for c in summary.columns if c.endswith("_mean")]


def add_reference(summary: pd.DataFrame, reference: Reference | pd.DataFrame) -> pd.DataFrame:
    """Return a copy of ``summary`` with the paper's values beside ours.

    ``reference`` is a :class:`~mmrepro.report.reference.Reference` (or a frame that
    :func:`~mmrepro.report.reference.reference_frame` completes), keyed by dataset, setting,
    method and metric; a blank setting applies to every setting of that dataset and method.
    For each metric it mentions, ``m_paper`` (our units), ``m_paper_printed``, ``m_paper_note``
    (footnote text) and ``m_diff`` (ours minus paper, our units) follow ``m_oracle``; a metric we
    did not compute gets empty columns of ours. A paper cell with no run of ours becomes a row
    with ``n == 0`` after that dataset's runs (:func:`write_paper_table` shows them, the study
    table does not). ``attrs["scale"]`` gives the paper's units per metric; a metric whose
    references disagree on it raises ``ValueError``.
    """
    ref = reference_frame(reference)
    out = summary.drop(columns=[c for c in summary.columns if c.endswith(("_paper", "_paper_printed",
                                                                          "_paper_note", "_diff"))])
    metrics = _summary_metrics(out)
    new = [m for m in dict.fromkeys(ref["metric"]) if m not in metrics]
    for m in new:
        for stat in ("mean", "std", *_BOUNDS):
            out[f"{m}_{stat}"] = math.nan
    metrics += new

    ran = set(zip(out["dataset"], out["method"], out["setting"].astype(str)))
    ran_any = {(d, me) for d, me, _ in ran}
    missing = []
    for r in ref.itertuples(index=False):
        key = (r.dataset, r.method, r.setting)
        if (key not in ran if r.setting else (r.dataset, r.method) not in ran_any) and key not in missing:
            missing.append(key)
    if missing:
        blank = {"backbone": "", "task": "", "n": 0, "trainable_params": math.nan, "backbone_params": math.nan,
                 "trainable_share": math.nan}
        rows = pd.DataFrame([{"dataset": d, "method": me, "setting": se, **blank} for d, me, se in missing])
        out = pd.concat([out, rows], ignore_index=True).sort_values("dataset", kind="stable", ignore_index=True)

    exact = {(r.dataset, r.method, r.setting, r.metric): r for r in ref.itertuples(index=False) if r.setting}
    general = {(r.dataset, r.method, r.metric): r for r in ref.itertuples(index=False) if not r.setting}
    scale: dict[str, float] = {}
    for m in dict.fromkeys(ref["metric"]):
        scales = set(ref.loc[ref["metric"] == m, "scale"].astype(float))
        if len(scales) > 1:
            raise ValueError(f"reference prints metric {m!r} in several units (scales {sorted(scales)})")
        scale[m] = scales.pop()
        hits = [exact.get((d, me, str(se), m), general.get((d, me, m)))
                for d, me, se in zip(out["dataset"], out["method"], out["setting"])]
        paper = [math.nan if h is None else float(h.value) for h in hits]
        at = out.columns.get_loc(f"{m}_ceiling" if f"{m}_ceiling" in out.columns else f"{m}_oracle") + 1
        for i, (col, vals) in enumerate((
                (f"{m}_paper", paper),
                (f"{m}_paper_printed", ["" if h is None else h.printed for h in hits]),
                (f"{m}_paper_note", ["" if h is None else h.footnote for h in hits]),
                (f"{m}_diff", (out[f"{m}_mean"].to_numpy(dtype=float) - paper).tolist()))):
            out.insert(at + i, col, vals)
    ordered = [*_ID_COLUMNS] + [f"{m}_{f}" for m in metrics for f in _METRIC_FIELDS if f"{m}_{f}" in out.columns]
    out = out[ordered].astype({"n": "int64"})
    out.attrs.update(summary.attrs)
    out.attrs.update(metrics=metrics, scale={**summary.attrs.get("scale", {}), **scale})
    if isinstance(reference, Reference):
        out.attrs.update(paper=reference.paper, absent=reference.absent)
    return out


_METRIC_FIELDS = ("mean", "std", *_BOUNDS, "paper", "paper_printed", "paper_note", "diff")


def add_baseline_delta(summary: pd.DataFrame, runs: pd.DataFrame, baseline: str = "source_only") -> pd.DataFrame:
    """A copy of ``summary`` with ``m_delta`` after each metric's other columns: the mean over seeds of
    the run's value minus ``baseline``'s on the same dataset, backbone, setting and seed (NaN where that
    run is missing). Returned unchanged when no ``baseline`` run exists (studies without one)."""
    df = split_rows(runs, summary.attrs.get("split", HEADLINE))
    if not (df["method"] == baseline).any():
        return summary
    ref = df[df["method"] == baseline].set_index(["dataset", "backbone", "setting", "seed", "metric"])["value"]
    out = summary.copy()
    for m in _summary_metrics(summary):
        deltas = []
        for ds, bb, meth, sett in zip(out["dataset"], out["backbone"], out["method"], out["setting"]):
            g = df[(df["dataset"] == ds) & (df["backbone"] == bb) & (df["method"] == meth) & (df["setting"] == sett)
                   & (df["metric"] == m)]
            diff = [v - ref.get((ds, bb, sett, s, m), math.nan) for s, v in zip(g["seed"], g["value"])]
            deltas.append(statistics.fmean(diff) if diff else math.nan)
        last = max(i for i, c in enumerate(out.columns) if c.startswith(f"{m}_"))
        out.insert(last + 1, f"{m}_delta", deltas)
    out.attrs.update(summary.attrs)
    return out


def backbone_labels(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with each method named ``<backbone>/<method>`` where it mixes several backbones (the
    shift study's axis), so that a plot keeps them apart; the frame itself otherwise."""
    if frame["backbone"].nunique() < 2:
        return frame
    return frame.assign(method=frame["backbone"] + "/" + frame["method"])


# --------------------------------------------------------------------------- writing


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` via a temp file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name opened with "xb" (not mkstemp) so the file gets the usual
    # umask-based permissions rather than 0600.
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "xb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _atomic_write_text(path: Path, text: str) -> None:
    """Write a report's text file, titled as a rehearsal on stand-in data when it is one (:mod:`.marking`)."""
    text = mark_text(path, text)
    _atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def _with_suffix(stem: Path, ext: str) -> Path:
    # Not Path.with_suffix: a stem like "table_0.3" must become "table_0.3.md".
    return stem.parent / f"{stem.name}{ext}"


def table_notes(summary: pd.DataFrame, paper_table: str = "") -> list[str]:
    """The lines under a study table: what the headline, the parameters, the bounds and the paper's
    columns are. ``paper_table`` names the file of the paper's cells without a run."""
    split = summary.attrs.get("split")
    lines = [HEADLINE_NOTE if split == HEADLINE and summary.attrs.get("cases") else
             f"{'Test' if split in (HEADLINE, 'test') else split} split; generated from metrics.json files.", SHARE_NOTE]
    bounds = [b for b in _BOUNDS if summary.filter(like=f"_{b}").notna().any().any()]
    if bounds:
        lines.append("oracle: the noise-free optimum of the data (synth's latents); ceiling: the best score reachable "
                     "from the modalities a run reads (docs/synth.md). Nothing may beat them.")
    if any(c.endswith("_paper") for c in summary.columns):
        paper = summary.attrs.get("paper") or "the paper"
        others = paper_table and (summary["n"] == 0).any()
        where = f" The paper's cells without a run of ours: {paper_table}." if others else ""
        lines.append(f"paper: {paper}, values as printed; Δ paper = ours − paper, in the column's unit.{where}")
    if summary.attrs.get("absent"):
        lines.append(summary.attrs["absent"])
    if any(c.endswith("_delta") for c in summary.columns):
        lines.append("Δ source only: mean over seeds of (method − source only) on the same backbone, setting and seed.")
    if summary.attrs.get("paired"):
        paired = summary.attrs["paired"]
        lines.append(f"paired Δ [CI] ({paired['metric']}): per seed, the run's value minus {paired['reference']}'s "
                     f"on the same dataset, backbone, setting and seed, in the column's unit; mean and "
                     f"{paired['interval']}.")
    lines += group_notes(summary.attrs.get("groups", {}))
    return lines


def study_title(summary: pd.DataFrame) -> str:
    study = summary.attrs.get("study") or "study"
    settings = pd.unique(summary.loc[summary["n"] > 0, "setting"])
    return f"{study}" + (f" · setting {settings[0]}" if len(settings) == 1 else "")


def write_table(
    summary: pd.DataFrame,
    stem: str | os.PathLike,
    reference: Reference | pd.DataFrame | None = None,
    paper_table: str = "",
) -> list[Path]:
    """Write ``stem.md``, ``stem.csv``, ``stem.tex`` and ``stem.html`` from a :func:`summarize` frame.

    * ``.md``, ``.tex``, ``.html``: the run rows in the papers' layout
      (:func:`~mmrepro.report.render.study_table`): methods x datasets x metrics, each metric in one
      unit, the best per column in bold, bound rows, the paper's value and Δ beside ours where the
      paper has the cell; ``.tex`` a booktabs ``tabular`` (no float environment) to ``\\input``.
    * ``.csv``: the summary itself (paper-only rows too), full precision, in our units (fractions),
      separate ``m_mean``, ``m_std``, ``m_oracle``, ``m_ceiling`` (and ``m_paper``...) columns; NaN is
      an empty cell.

    ``reference`` (see :func:`add_reference`) replaces any paper columns already present;
    ``paper_table`` names where :func:`write_paper_table` puts the paper's other cells (for the
    notes). Parent folders are created; each file is written atomically. Returns the four paths.
    """
    stem = Path(stem)
    if reference is not None:
        summary = add_reference(summary, reference)
    if summary.empty:
        raise ValueError("summary is empty; nothing to write")
    table = study_table(summary, _summary_metrics(summary), study_title(summary), table_notes(summary, paper_table))
    paths = [_with_suffix(stem, ext) for ext in (".md", ".csv", ".tex", ".html")]
    buf = io.StringIO()
    summary.to_csv(buf, index=False)
    for path, text in zip(paths, (markdown(table), buf.getvalue(), latex(table), html_page([table]))):
        _atomic_write_text(path, text)
    return paths


def write_paper_table(summary: pd.DataFrame, stem: str | os.PathLike) -> list[Path]:
    """Write ``stem.md`` and ``stem.html``: the paper's cells without a run of ours (rows ``n == 0``
    of :func:`add_reference`), in the paper's layout (:func:`~mmrepro.report.render.paper_tables`)."""
    stem = Path(stem)
    tables = paper_tables(summary, _summary_metrics(summary))
    paper = summary.attrs.get("paper") or "the paper"
    head = (f"The cells of {paper} without a run of ours in this configuration, values as printed "
            "(the study table shows the paper beside each run it has a cell for).")
    if not tables:
        head = summary.attrs.get("absent") or f"Every cell of {paper} has a run of ours: see the study table."
    md = "\n".join([wrap(head), "", *(markdown(t, level=3) for t in tables)])
    paths = [_with_suffix(stem, ".md"), _with_suffix(stem, ".html")]
    _atomic_write_text(paths[0], md)
    _atomic_write_text(paths[1], html_page(tables, [head]))
    return paths
