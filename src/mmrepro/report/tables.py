"""Read ``metrics.json`` files and turn them into summary tables.

Only the JSON files the pipeline writes are read, so a table can be rebuilt
offline from a results folder alone.

Summary frame layout (what :func:`summarize` returns and :func:`write_table`
expects): identifier columns ``dataset, method, setting, task, n`` followed,
per metric ``m`` in order, by ``m_mean``, ``m_std``, ``m_oracle`` (the noise-free
latent optimum), ``m_ceiling`` (the best score reachable from the modalities the run
reads, see :mod:`mmrepro.data.synth`) and, only when a reference was given, ``m_paper``.
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

__all__ = [
    "DEFAULT_METRICS",
    "MAIN_METRIC",
    "LOWER_IS_BETTER",
    "RUN_COLUMNS",
    "load_runs",
    "summarize",
    "add_reference",
    "add_baseline_delta",
    "write_table",
]

#: Metrics shown by default, per task, in this order.
DEFAULT_METRICS: dict[str, tuple[str, ...]] = {
    "regression": ("mae", "corr", "acc2_has0", "f1_has0", "acc2_non0", "f1_non0", "acc7"),
    "sims_regression": ("mae", "corr", "acc2", "f1", "acc3", "acc5"),
    "classification": ("acc", "f1_weighted"),
    "segmentation": ("dice_et", "dice_tc", "dice_wt", "dice_mean"),
}
#: The single headline metric per task (used by the plot).
MAIN_METRIC: dict[str, str] = {"regression": "mae", "sims_regression": "mae", "classification": "acc",
                               "segmentation": "dice_mean"}
#: Metrics where a smaller value is better; every other metric is higher-is-better.
LOWER_IS_BETTER: frozenset[str] = frozenset({"mae"})

#: Columns of the long frame returned by :func:`load_runs`.
RUN_COLUMNS: tuple[str, ...] = (
    "study", "dataset", "method", "setting", "seed", "task", "backbone",
    "split", "metric", "value", "oracle", "ceiling", "trainable_params", "path",
)
#: Per-split score blocks a metrics.json may carry beside its metrics, one table column each.
_BOUNDS = ("oracle", "ceiling")
_ID_COLUMNS = ("dataset", "method", "setting", "task", "n")
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

    metrics = _metric_block(path, "metrics", doc["metrics"])
    bounds = {key: {} if doc.get(key) in (None, {}) else _metric_block(path, key, doc[key]) for key in _BOUNDS}

    # a test-time run that read target labels (CASP's released code) is marked wherever it is shown
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
                "trainable_params": int(doc["trainable_params"]), "path": str(path),
            })
    return rows


def load_runs(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> pd.DataFrame:
    """Read ``metrics.json`` files into one long frame (one row per run x split x metric).

    Columns: :data:`RUN_COLUMNS` (``study, dataset, method, setting, seed, task,
    backbone, split, metric, value, oracle, ceiling, trainable_params, path``). ``setting``
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


def summarize(
    runs: pd.DataFrame,
    split: str = "test",
    metrics: Sequence[str] | None = None,
    reference: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per (dataset, method, setting): mean/std over seeds, seed count, oracle.

    ``runs`` is the frame of :func:`load_runs`. ``metrics`` defaults to
    :data:`DEFAULT_METRICS` of the task(s) present (those found in the data).
    Columns: ``dataset, method, setting, task, n`` then per metric ``m``:
    ``m_mean``, ``m_std`` (sample std, ddof=1; NaN when n == 1 -- a single seed
    has no spread, and 0.0 would be misleading), ``m_oracle`` and ``m_ceiling`` (NaN when none) and,
    with ``reference``, ``m_paper`` (see :func:`add_reference`). A seed lacking a
    metric (or having NaN) makes that cell's mean NaN rather than silently
    averaging fewer seeds.

    Row order: datasets sorted, then methods and settings in order of first
    appearance in ``runs``. Raises ``ValueError`` when there is nothing to
    summarize, a requested metric is absent, a (dataset, method, setting, seed)
    appears twice (e.g. several studies/backbones mixed -- filter first), or seeds
    disagree on the oracle.
    """
    missing_cols = set(RUN_COLUMNS) - {"path", "trainable_params"} - set(runs.columns)
    if missing_cols:
        raise ValueError(f"runs frame lacks columns {sorted(missing_cols)}; use load_runs()")
    df = runs[runs["split"] == split]
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

    keys = ["dataset", "method", "setting"]
    dup = df.duplicated([*keys, "seed", "metric"], keep=False)
    if dup.any():
        d = df[dup].iloc[0]
        raise ValueError(
            f"run {d['dataset']}/{d['method']}/{d['setting']}/seed {d['seed']} appears more than "
            "once (several studies or backbones mixed?); filter runs before summarizing")

    method_order = {m: i for i, m in enumerate(pd.unique(df["method"]))}
    setting_order = {s: i for i, s in enumerate(pd.unique(df["setting"]))}
    rows = []
    for (ds, meth, sett), g in df.groupby(keys, sort=False):
        tasks = pd.unique(g["task"])
        if len(tasks) > 1:
            raise ValueError(f"{ds}/{meth}/{sett}: runs disagree on task {list(tasks)}")
        seeds = pd.unique(g["seed"])
        n = len(seeds)
        row: dict[str, object] = {"dataset": ds, "method": meth, "setting": sett,
                                  "task": tasks[0], "n": n}
        by_metric = dict(tuple(g.groupby("metric", sort=False)))
        for m in chosen:
            gm = by_metric.get(m)
            if gm is None:
                mean = std = ora = ceil = math.nan
            else:
                vals = gm.set_index("seed")["value"].reindex(seeds).to_numpy(dtype=float).tolist()
                if any(math.isnan(v) for v in vals):
                    mean = std = math.nan
                else:  # statistics: exact-ish (fsum), so constant values give std 0.0
                    mean = statistics.fmean(vals)
                    std = statistics.stdev(vals) if n > 1 else math.nan
                ora = _oracle_of(gm, f"{ds}/{meth}/{sett}/{m}")
                ceil = _oracle_of(gm, f"{ds}/{meth}/{sett}/{m}", "ceiling")
            row[f"{m}_mean"], row[f"{m}_std"], row[f"{m}_oracle"], row[f"{m}_ceiling"] = mean, std, ora, ceil
        rows.append(row)

    rows.sort(key=lambda r: (r["dataset"], method_order[r["method"]], setting_order[r["setting"]]))
    columns = [*_ID_COLUMNS] + [f"{m}_{s}" for m in chosen for s in ("mean", "std", *_BOUNDS)]
    summary = pd.DataFrame(rows, columns=columns).astype({"n": "int64"})
    summary.attrs.update(metrics=list(chosen), split=split)
    if reference is not None:
        summary = add_reference(summary, reference)
    return summary


def _summary_metrics(summary: pd.DataFrame) -> list[str]:
    ms = summary.attrs.get("metrics")
    if ms and all(f"{m}_mean" in summary.columns for m in ms):
        return list(ms)
    return [c[: -len("_mean")] for c in summary.columns if c.endswith("_mean")]


def add_reference(summary: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    """Return a copy of ``summary`` with a ``m_paper`` column after ``m_ceiling`` (or ``m_oracle``).

    ``reference`` has columns ``dataset, method, metric, value`` and optionally
    ``setting``; a row whose setting is absent/empty applies to every setting of
    that dataset/method, a row with a setting only to that setting (compared as
    strings). A ``m_paper`` column is added for each summarized metric the
    reference mentions; cells without a reference number are NaN. Reference rows
    for metrics that are not in the summary are ignored; duplicate keys raise
    ``ValueError``.
    """
    need = {"dataset", "method", "metric", "value"}
    if not need <= set(reference.columns):
        raise ValueError(f"reference needs columns {sorted(need)} (+ optional 'setting'), "
                         f"got {list(reference.columns)}")
    exact: dict[tuple, float] = {}
    general: dict[tuple, float] = {}
    has_setting = "setting" in reference.columns
    for r in reference.itertuples(index=False):
        sett = getattr(r, "setting") if has_setting else None
        blank = sett is None or (isinstance(sett, float) and math.isnan(sett)) or str(sett) == ""
        key = (str(r.dataset), str(r.method), str(r.metric)) if blank else \
              (str(r.dataset), str(r.method), str(sett), str(r.metric))
        table = general if blank else exact
        if key in table:
            raise ValueError(f"reference has more than one value for {key}")
        table[key] = float(r.value)

    out = summary.drop(columns=[c for c in summary.columns if c.endswith("_paper")])
    metrics = _summary_metrics(out)
    mentioned = {str(m) for m in reference["metric"]}
    for m in metrics:
        if m not in mentioned:
            continue
        vals = [exact.get((ds, me, str(se), m), general.get((ds, me, m), math.nan))
                for ds, me, se in zip(out["dataset"], out["method"], out["setting"])]
        last = f"{m}_ceiling" if f"{m}_ceiling" in out.columns else f"{m}_oracle"
        out.insert(out.columns.get_loc(last) + 1, f"{m}_paper", vals)
    out.attrs.update(summary.attrs)
    return out


def add_baseline_delta(summary: pd.DataFrame, runs: pd.DataFrame, baseline: str = "source_only") -> pd.DataFrame:
    """A copy of ``summary`` with ``m_delta`` after each metric's other columns: the mean over seeds of
    the run's value minus ``baseline``'s on the same dataset, setting and seed (NaN where that run is
    missing). Returned unchanged when no ``baseline`` run exists (studies without one)."""
    split = summary.attrs.get("split", "test")
    df = runs[runs["split"] == split]
    if not (df["method"] == baseline).any():
        return summary
    ref = df[df["method"] == baseline].set_index(["dataset", "setting", "seed", "metric"])["value"]
    out = summary.copy()
    for m in _summary_metrics(summary):
        deltas = []
        for ds, meth, sett in zip(out["dataset"], out["method"], out["setting"]):
            g = df[(df["dataset"] == ds) & (df["method"] == meth) & (df["setting"] == sett) & (df["metric"] == m)]
            diff = [v - ref.get((ds, sett, s, m), math.nan) for s, v in zip(g["seed"], g["value"])]
            deltas.append(statistics.fmean(diff) if diff else math.nan)
        last = max(i for i, c in enumerate(out.columns) if c.startswith(f"{m}_"))
        out.insert(last + 1, f"{m}_delta", deltas)
    out.attrs.update(summary.attrs)
    return out


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
    _atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def _with_suffix(stem: Path, ext: str) -> Path:
    # Not Path.with_suffix: a stem like "table_0.3" must become "table_0.3.md".
    return stem.parent / f"{stem.name}{ext}"


def _fmt(x: float, digits: int) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _display(summary: pd.DataFrame, digits: int, pm: str) -> tuple[list[str], list[list[str]], int]:
    """Header and string cells shared by the Markdown and LaTeX writers.

    Returns (header, rows, number of identifier columns). Oracle/paper columns
    that are empty for every row are dropped (the CSV keeps them).
    """
    metrics = _summary_metrics(summary)
    id_cols = ["dataset", "method", "setting", "n"]
    header = list(id_cols)
    getters: list[Callable[[pd.Series], str]] = []
    for m in metrics:
        header.append(m)

        def cell(r: pd.Series, m: str = m) -> str:
            mean, std = r[f"{m}_mean"], r[f"{m}_std"]
            if pd.isna(mean):
                return ""
            return _fmt(mean, digits) if pd.isna(std) else f"{_fmt(mean, digits)}{pm}{_fmt(std, digits)}"
        getters.append(cell)
        for extra, label in (*((b, b) for b in _BOUNDS), ("paper", "paper"), ("delta", "vs source only")):
            col = f"{m}_{extra}"
            if col in summary.columns and summary[col].notna().any():
                header.append(f"{m} ({label})")
                getters.append(lambda r, col=col: _fmt(r[col], digits))
    rows = [[str(r[c]) for c in id_cols] + [g(r) for g in getters] for _, r in summary.iterrows()]
    return header, rows, len(id_cols)


def _markdown(summary: pd.DataFrame, digits: int) -> str:
    header, rows, n_id = _display(summary, digits, " ± ")

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
    align = ["---"] * (n_id - 1) + ["---:"] * (len(header) - n_id + 1)
    split = summary.attrs.get("split")
    note = (f"Mean ± sample std over seeds ({split} split; n = number of seeds; "
            "std omitted when n = 1). Generated from metrics.json files.")
    return "\n".join([line(header), line(align), *map(line, rows), "", note, ""])


_TEX_ESCAPES = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    """Escape LaTeX special characters in plain text."""
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in str(text))


def _latex(summary: pd.DataFrame, digits: int) -> str:
    header, rows, n_id = _display(summary, digits, " $\\pm$ ")
    spec = "l" * (n_id - 1) + "r" * (len(header) - n_id + 1)
    out = [
        "% Generated by mmrepro.report from metrics.json files (needs \\usepackage{booktabs}).",
        f"% Mean $\\pm$ sample std over seeds; split: {latex_escape(summary.attrs.get('split', ''))}.",
        f"\\begin{{tabular}}{{{spec}}}",
        "\\toprule",
        " & ".join(latex_escape(h) for h in header) + " \\\\",
        "\\midrule",
    ]
    prev = None
    for cells in rows:
        if prev is not None and cells[0] != prev:
            out.append("\\midrule")
        prev = cells[0]
        # Metric cells already contain LaTeX ($\pm$) and only digits otherwise.
        out.append(" & ".join([latex_escape(c) for c in cells[:n_id]] + cells[n_id:]) + " \\\\")
    out += ["\\bottomrule", "\\end{tabular}", ""]
    return "\n".join(out)


def write_table(
    summary: pd.DataFrame,
    stem: str | os.PathLike,
    reference: pd.DataFrame | None = None,
    digits: int = 3,
) -> list[Path]:
    """Write ``stem.md``, ``stem.csv`` and ``stem.tex`` from a :func:`summarize` frame.

    * ``.md``: cells ``"0.612 ± 0.010"`` (mean only when n == 1), plus
      ``"m (oracle)"`` / ``"m (ceiling)"`` / ``"m (paper)"`` columns where any row has a value.
    * ``.csv``: the summary itself, full precision, separate ``m_mean``,
      ``m_std``, ``m_oracle``, ``m_ceiling`` (and ``m_paper``) columns; NaN is an empty cell.
    * ``.tex``: a booktabs ``tabular`` (no float environment) to ``\\input``.

    ``reference`` (see :func:`add_reference`) replaces any paper columns already
    present. Parent folders are created; each file is written atomically.
    Returns the three paths written.
    """
    stem = Path(stem)
    if reference is not None:
        summary = add_reference(summary, reference)
    if summary.empty:
        raise ValueError("summary is empty; nothing to write")
    paths = [_with_suffix(stem, ext) for ext in (".md", ".csv", ".tex")]
    buf = io.StringIO()
    summary.to_csv(buf, index=False)
    for path, text in zip(paths, (_markdown(summary, digits), buf.getvalue(), _latex(summary, digits))):
        _atomic_write_text(path, text)
    return paths
