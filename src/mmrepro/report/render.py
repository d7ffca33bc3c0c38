"""A study's summary as tables in the papers' layout, written as Markdown, LaTeX (booktabs) and HTML.

Why a layout of its own: one row per dataset, method and setting with ours, the oracle, the
ceiling, the paper and the difference as columns per metric buried a few runs among hundreds
of paper rows and dozens of columns. Here (:func:`study_table`):

- rows are methods, one block per setting (and backbone, where a study has several), each block
  closed by its *bound rows*: the oracle (noise-free optimum) and the ceiling (best score from the
  modalities read), one value per column where the data has them;
- columns are one group per dataset run (paper cells without a run of ours go to
  :func:`paper_tables`): its trainable parameters, then per metric of the dataset's task one
  column per :data:`KINDS` entry that some row fills: ours (mean ± std over seeds, the best of its
  block in bold), the paper's value, ours − paper, the shift study's difference to source only, the
  main metric's paired difference to the study's reference row with its bootstrap interval.
  A metric equal to an earlier one on every run of a dataset (per seed: ``acc2_non0`` =
  ``acc2_has0`` where no test label is 0) is shown once, and the notes say so;
- each metric has one unit, whatever a paper prints: :data:`PERCENT` metrics in %, the others as
  computed; the header states it, with the direction (↓ lower is better).

A column kind is one :class:`ValueKind` in :data:`KINDS` reading its summary columns
(``<metric>_<suffix>``): the paired difference to the study's reference row with its interval
(:func:`mmrepro.report.paired.add_paired`) is one. The writers take the format-free :class:`Table`.
"""

from __future__ import annotations

import html
import math
import re
import textwrap
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from .groups import INCOMPLETE

__all__ = ["PERCENT", "MAIN_METRIC", "LOWER_IS_BETTER", "PRETTY", "HEADLINE_NOTE", "SHARE_NOTE", "BOUNDS", "Cell",
           "Row", "Table", "Unit", "CellContext", "ValueKind", "KINDS", "Column", "Footnotes", "metric_label",
           "unit_of", "header_of", "decimals", "shown_metrics", "study_table", "params_text", "mark_best",
           "paper_tables", "markdown", "latex", "html_page", "latex_escape", "group_notes", "wrap"]

#: Metrics shown in % in every table (the papers print them so); any other metric as computed.
PERCENT = re.compile(r"(acc|f1|dice)(\d|_|$)")
#: The single headline metric per task (the plots' metric; the one a per-main-metric value kind shows).
MAIN_METRIC: dict[str, str] = {"regression": "mae", "sims_regression": "mae", "classification": "acc",
                               "segmentation": "dice_mean"}
#: Metrics where a smaller value is better; every other metric is higher-is-better.
LOWER_IS_BETTER: frozenset[str] = frozenset({"mae"})
#: Short names for headers and axes.
PRETTY = {
    "mae": "MAE", "corr": "Corr", "acc": "Acc", "f1_weighted": "F1-w", "acc2": "Acc-2", "f1": "F1",
    "acc2_has0": "Acc-2 has0", "f1_has0": "F1 has0", "acc2_non0": "Acc-2 non0", "f1_non0": "F1 non0",
    "acc3": "Acc-3", "acc5": "Acc-5", "acc7": "Acc-7", "dice_et": "Dice-ET", "dice_tc": "Dice-TC",
    "dice_wt": "Dice-WT", "dice_mean": "Dice-avg",
}
#: The headline number's definition, said under every table and plot that shows it.
HEADLINE_NOTE = ("Headline: a run's mean over its available-modality-set test cases (test:avg, MPLMM's 'Avg', "
                 "each set weighted equally) where it has them, else its test split.")
#: The trainable share's definition, said wherever it is shown.
SHARE_NOTE = ("params: trainable parameters (% of backbone: their share of the parameters of the model before "
              "the method's transform, the backbone it adapts; 100 % for a model trained from scratch).")
_DEFAULT_DECIMALS = {100.0: 1, 1.0: 3}


def metric_label(metric: str) -> str:
    """A metric's short name, e.g. ``"Acc-2 has0"``."""
    return PRETTY.get(metric, metric)


def unit_of(metric: str) -> float:
    """Display units per computed unit: 100 for :data:`PERCENT` metrics, else 1."""
    return 100.0 if PERCENT.match(metric) else 1.0


def header_of(metric: str, direction: bool = True) -> str:
    """A metric's header: name, unit and direction (``"Acc-2 % ↑"``, ``"MAE ↓"``)."""
    unit = " %" if unit_of(metric) == 100 else ""
    arrow = f" {'↓' if metric in LOWER_IS_BETTER else '↑'}" if direction else ""
    return f"{metric_label(metric)}{unit}{arrow}"


_DECIMALS = re.compile(r"\s*[-+]?\d*(?:\.(\d+))?")


def decimals(printed: Iterable[str], default: int) -> int:
    """As many decimals as the paper prints for a metric (``default`` without a printed value)."""
    found = [len(m.group(1)) if m.group(1) else 0 for m in (_DECIMALS.match(p) for p in printed if p) if m]
    return max(found) if found else default


@dataclass(frozen=True)
class Unit:
    """How one metric's numbers are shown: display units per computed unit, decimals."""

    scale: float
    digits: int

    @classmethod
    def of(cls, metric: str, printed: Iterable[str] = ()) -> "Unit":
        scale = unit_of(metric)
        return cls(scale, decimals(printed, _DEFAULT_DECIMALS[scale]))

    def num(self, x: float) -> str:
        return "" if _missing(x) else f"{x * self.scale:.{self.digits}f}"

    def signed(self, x: float) -> str:
        return "" if _missing(x) else f"{x * self.scale:+.{self.digits}f}"

    def rounded(self, x: float) -> float:
        return round(x * self.scale, self.digits)


def _missing(x: object) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


# --------------------------------------------------------------------------- the format-free table


@dataclass(frozen=True)
class Cell:
    """One shown value: its text (plain: ``±``, digits, a paper's printed value), a footnote mark
    and whether it is the best of its column and block."""

    text: str = ""
    mark: str = ""
    best: bool = False


@dataclass(frozen=True)
class Row:
    ids: tuple[str, ...]
    cells: tuple[Cell, ...]


@dataclass(frozen=True)
class Table:
    """A table before formatting: identifier columns, value columns under their groups, blocks of rows."""

    title: str
    id_header: tuple[str, ...]
    groups: tuple[tuple[str, int], ...]  # (group label, number of value columns), in column order
    header: tuple[str, ...]  # one label per value column
    blocks: tuple[tuple[Row, ...], ...]
    notes: tuple[str, ...] = ()
    footnotes: tuple[tuple[str, str], ...] = ()

    @property
    def rows(self) -> list[Row]:
        return [r for b in self.blocks for r in b]


#: Footnote marks in order of use (then doubled: ††, ‡‡, ...), and their LaTeX.
_MARKS = ("†", "‡", "§", "¶", "‖")
_TEX_MARKS = {"†": r"\dag", "‡": r"\ddag", "§": r"\S", "¶": r"\P", "‖": r"\|"}


class Footnotes:
    """Distinct footnote texts -> marks, in order of first use."""

    def __init__(self) -> None:
        self._marks: dict[str, str] = {}

    def __call__(self, text: str) -> str:
        """The mark of ``text`` (a new one on first use); "" for no text."""
        if text and text not in self._marks:
            i = len(self._marks)
            self._marks[text] = _MARKS[i % len(_MARKS)] * (i // len(_MARKS) + 1)
        return self._marks.get(text, "")

    def items(self) -> list[tuple[str, str]]:
        """(mark, text) in order of use."""
        return [(mk, text) for text, mk in self._marks.items()]


# --------------------------------------------------------------------------- value kinds


@dataclass(frozen=True)
class CellContext:
    """What a value kind needs beside the row: the metric, its unit, the paper's units for it (a
    paper value is shown as printed where those equal ours, else converted), the footnotes and the
    incomplete group cells."""

    metric: str
    unit: Unit
    footnotes: Footnotes
    paper_scale: float = 1.0
    incomplete: frozenset = frozenset()


@dataclass(frozen=True)
class ValueKind:
    """One column per metric: ``header`` (``{m}`` is the metric's name) and the cell of a row.

    ``column`` is the summary column (``<metric>_<column>``) whose presence on some row of a
    dataset shows this kind for that dataset's metric.
    """

    column: str
    header: str
    cell: Callable[[pd.Series, CellContext], Cell]
    main_only: bool = False  # shown for the task's main metric only (keeps a table on a screen)


def _ours(row: pd.Series, ctx: CellContext) -> Cell:
    m, unit = ctx.metric, ctx.unit
    mean, std = row[f"{m}_mean"], row[f"{m}_std"]
    if _missing(mean):
        key = (row["dataset"], row["backbone"], row["method"], row["setting"], m)
        return Cell(INCOMPLETE if key in ctx.incomplete else "")
    return Cell(unit.num(mean) if _missing(std) else f"{unit.num(mean)}±{unit.num(std)}")


def _paper(row: pd.Series, ctx: CellContext) -> Cell:
    m = ctx.metric
    value = row.get(f"{m}_paper", math.nan)
    if _missing(value):
        return Cell()
    printed = row.get(f"{m}_paper_printed", "") or ""
    shown = printed if printed and ctx.paper_scale == ctx.unit.scale else ctx.unit.num(value)
    return Cell(shown, ctx.footnotes(row.get(f"{m}_paper_note", "") or ""))


def _signed(column: str) -> Callable[[pd.Series, CellContext], Cell]:
    def cell(row: pd.Series, ctx: CellContext) -> Cell:
        return Cell(ctx.unit.signed(row.get(f"{ctx.metric}_{column}", math.nan)))
    return cell


def _paired(row: pd.Series, ctx: CellContext) -> Cell:
    """The paired difference to the study's reference row and its interval (:mod:`mmrepro.report.paired`)."""
    m, unit = ctx.metric, ctx.unit
    mean = row.get(f"{m}_paired", math.nan)
    if _missing(mean):
        return Cell()
    return Cell(f"{unit.signed(mean)} [{unit.signed(row[f'{m}_paired_low'])}, {unit.signed(row[f'{m}_paired_high'])}]")


#: The value columns of each metric, in order. Ours always; the others where some row has a value.
KINDS: tuple[ValueKind, ...] = (
    ValueKind("mean", "{m}", _ours),
    ValueKind("paper", "{m} paper", _paper),
    ValueKind("diff", "{m} Δ paper", _signed("diff")),
    ValueKind("delta", "{m} Δ source only", _signed("delta"), main_only=True),
    ValueKind("paired", "{m} paired Δ [CI]", _paired, main_only=True),
)


# --------------------------------------------------------------------------- the study table


@dataclass(frozen=True)
class Column:
    """One value column of a study table: a dataset's params (``metric`` None) or one kind of a metric."""

    dataset: str
    metric: str | None = None
    kind: ValueKind | None = None
    unit: Unit | None = None

    @property
    def ours(self) -> bool:
        return self.kind is not None and self.kind.column == "mean"


def shown_metrics(summary: pd.DataFrame, dataset: str, metrics: Sequence[str], same: dict[str, dict[str, str]],
                  incomplete: frozenset = frozenset()) -> tuple[list[str], list[str]]:
    """The metrics shown for ``dataset`` (those with a value or an incomplete group cell on some row)
    and the notes on those left out because they equal a shown one on every run (``same``:
    :func:`~mmrepro.report.tables.equal_metrics`). Of equal metrics the one the paper reports is kept."""
    rows = summary[summary["dataset"] == dataset]

    def has(m: str, suffix: str) -> bool:
        return f"{m}_{suffix}" in rows.columns and rows[f"{m}_{suffix}"].notna().any()
    unfinished = {key[-1] for key in incomplete if key[0] == dataset}
    shown = [m for m in metrics if has(m, "mean") or has(m, "paper") or m in unfinished]
    notes = []
    for dropped, kept in same.get(dataset, {}).items():
        if dropped in shown and kept in shown:
            if has(dropped, "paper") and not has(kept, "paper"):
                dropped, kept = kept, dropped
            if has(dropped, "paper"):
                continue  # both reported by the paper: keep both
            shown.remove(dropped)
            notes.append(f"{dropped} = {kept}")
    return shown, notes


def _mode(values: Iterable[int]) -> int:
    counts = Counter(values)
    return max(counts, key=lambda k: (counts[k], k)) if counts else 0


def study_table(summary: pd.DataFrame, metrics: Sequence[str], title: str = "", notes: Sequence[str] = ()) -> Table:
    """The summary's run rows (``n > 0``) in the papers' layout (see the module doc)."""
    runs = summary[summary["n"] > 0].copy()
    runs.attrs = {}  # read from summary; pandas would deep-copy them on every selection below
    if runs.empty:
        raise ValueError("no run rows to show (every row is a paper cell without a run)")
    incomplete = frozenset(summary.attrs.get("incomplete", ()))
    scales = summary.attrs.get("scale", {})
    footnotes = Footnotes()
    datasets = sorted(pd.unique(runs["dataset"]))
    n_mode = _mode(runs["n"].astype(int))
    several_backbones = runs["backbone"].replace("", np.nan).nunique() > 1
    several_settings = runs["setting"].nunique() > 1
    id_header = (*(("backbone",) if several_backbones else ()), *(("setting",) if several_settings else ()), "method")

    columns: list[Column] = []
    groups, header, dropped = [], [], []
    for ds in datasets:
        sub = runs[runs["dataset"] == ds]
        shown, same = shown_metrics(runs, ds, metrics, summary.attrs.get("same", {}), incomplete)
        dropped += [f"{ds}: {s}" for s in same]
        start = len(columns)
        if sub["trainable_params"].notna().any():
            columns.append(Column(ds))
            header.append("params")
        main = MAIN_METRIC.get(sub["task"].iloc[0])
        for m in shown:
            same_unit = f"{m}_paper_printed" in sub.columns and scales.get(m, unit_of(m)) == unit_of(m)
            unit = Unit.of(m, sub[f"{m}_paper_printed"] if same_unit else ())  # the paper's decimals
            for kind in KINDS:
                col = f"{m}_{kind.column}"
                if kind.main_only and m != main:
                    continue
                if kind.column == "mean" or (col in sub.columns and sub[col].notna().any()):
                    columns.append(Column(ds, m, kind, unit))
                    header.append(kind.header.format(m=header_of(m) if kind.column == "mean" else metric_label(m)))
        groups.append((ds, len(columns) - start))

    blocks = []
    block_keys = [k for k in ("backbone", "setting") if k in id_header]
    by_block = runs.groupby(block_keys, sort=False) if block_keys else [((), runs)]
    for key, block in by_block:
        key = key if isinstance(key, tuple) else (key,)
        methods = list(pd.unique(block["method"]))
        cells: dict[str, list[Cell]] = {m: [] for m in methods}
        for col in columns:
            here = {r["method"]: r for _, r in block[block["dataset"] == col.dataset].iterrows()}
            col_cells = {}
            for meth in methods:
                r = here.get(meth)
                if r is None:
                    col_cells[meth] = Cell()
                elif col.metric is None:
                    col_cells[meth] = Cell(params_text(r["trainable_params"], r.get("trainable_share", math.nan)))
                else:
                    ctx = CellContext(col.metric, col.unit, footnotes, scales.get(col.metric, 1.0), incomplete)
                    c = col.kind.cell(r, ctx)
                    if col.ours and c.text and c.text != INCOMPLETE and int(r["n"]) != n_mode:
                        c = Cell(f"{c.text} (n={int(r['n'])})", c.mark)
                    col_cells[meth] = c
            if col.ours:
                col_cells = mark_best(col_cells, {m: here[m][f"{col.metric}_mean"] for m in here}, col.metric, col.unit)
            for meth in methods:
                cells[meth].append(col_cells[meth])
        rows = [Row((*key, meth), tuple(cells[meth])) for meth in methods]
        rows += _bound_rows(block, key, columns)
        blocks.append(tuple(rows))

    n_text = f"n = {n_mode} seeds" if n_mode > 1 else "n = 1 seed, no std"
    if (runs["n"] != n_mode).any():
        n_text += "; (n=k) marks a cell with another count"
    lead = (f"Mean±std over seeds ({n_text}). "
            f"Bold: the best method of its column{' within its block' if block_keys else ''} (↓ lower is better, "
            "↑ higher); Acc, F1 and Dice in %.")
    all_notes = [lead, *notes]
    if dropped:
        all_notes.append("Shown once, equal on every run and seed: " + "; ".join(dropped) + ".")
    return Table(title=title, id_header=id_header, groups=tuple(groups), header=tuple(header),
                 blocks=tuple(blocks), notes=tuple(all_notes), footnotes=tuple(footnotes.items()))


def params_text(trainable: float, share: float) -> str:
    """The params cell of every table: trainable parameters and their share of the backbone
    (:data:`SHARE_NOTE`), e.g. ``"7,203 (8.3 %)"``."""
    if _missing(trainable):
        return ""
    return f"{trainable:,.0f}" + ("" if _missing(share) or trainable == 0 else f" ({100 * share:.1f} %)")


def mark_best(cells: dict[str, Cell], means: dict[str, float], metric: str, unit: Unit) -> dict[str, Cell]:
    """``cells`` (key -> cell) with the best of ``means`` (key -> value) marked: the lowest for a
    :data:`LOWER_IS_BETTER` metric, else the highest, compared as shown (ties at the shown
    precision all marked); none where fewer than two values differ."""
    shown = {m: unit.rounded(v) for m, v in means.items() if not _missing(v)}
    if len(set(shown.values())) < 2:
        return cells  # one value, or all tied: nothing stands out
    best = (min if metric in LOWER_IS_BETTER else max)(shown.values())
    return {m: Cell(c.text, c.mark, best=shown.get(m) == best) for m, c in cells.items()}


#: The bound rows: summary column suffix -> row label.
BOUNDS = {"oracle": "oracle (noise-free)", "ceiling": "ceiling (modalities read)"}


def _bound_rows(block: pd.DataFrame, key: tuple, columns: list[Column]) -> list[Row]:
    """One row per bound some column of the block has: its value (one per dataset and metric; a
    range where the block's methods disagree) in the ours column, nothing elsewhere."""
    rows = []
    for bound, label in BOUNDS.items():
        cells = []
        for col in columns:
            name = f"{col.metric}_{bound}"
            values = (block.loc[block["dataset"] == col.dataset, name].dropna().unique()
                      if col.ours and name in block.columns else [])
            lo, hi = (min(values), max(values)) if len(values) else (math.nan, math.nan)
            low, high = ("", "") if _missing(lo) else (col.unit.num(lo), col.unit.num(hi))
            cells.append(Cell(low if low == high else f"{low}–{high}"))
        if any(c.text for c in cells):
            rows.append(Row((*key, label), tuple(cells)))
    return rows


# --------------------------------------------------------------------------- paper cells without a run


def paper_tables(summary: pd.DataFrame, metrics: Sequence[str]) -> list[Table]:
    """The paper's cells without a run of ours (rows ``n == 0`` of :func:`~mmrepro.report.tables.add_reference`),
    one table per dataset: rows = methods, columns = the paper's conditions (settings) x metrics, one
    table per dataset and metric where the dataset has several conditions (the paper's Table 1 layout)."""
    ref = summary[summary["n"] == 0]
    scales = summary.attrs.get("scale", {})
    footnotes = Footnotes()
    out = []
    for ds in sorted(pd.unique(ref["dataset"])):
        sub = ref[ref["dataset"] == ds]
        shown = [m for m in metrics if f"{m}_paper" in sub.columns and sub[f"{m}_paper"].notna().any()]
        settings = list(pd.unique(sub["setting"]))
        parts = [(m, [m]) for m in shown] if len(settings) > 1 else [("", shown)]
        for label, ms in parts:
            cols = [(s, m) for m in ms for s in settings
                    if sub.loc[sub["setting"] == s, f"{m}_paper"].notna().any()]
            header = tuple(s if label else header_of(m, direction=False) for s, m in cols)
            rows = []
            for meth in pd.unique(sub["method"]):
                cells = []
                for s, m in cols:
                    hit = sub[(sub["method"] == meth) & (sub["setting"] == s)]
                    r = hit.iloc[0] if len(hit) else None
                    ctx = CellContext(m, Unit.of(m, sub[f"{m}_paper_printed"]), footnotes, scales.get(m, 1.0))
                    cells.append(Cell() if r is None else _paper(r, ctx))
                if any(c.text for c in cells):
                    rows.append(Row((meth,), tuple(cells)))
            title = f"{ds}: {header_of(label, direction=False)}" if label else ds + (
                f" ({settings[0]})" if settings[0] else "")
            out.append(Table(title=title, id_header=("method",), groups=((ds, len(cols)),), header=header,
                             blocks=(tuple(rows),)))
    if out:
        out[-1] = replace(out[-1], footnotes=tuple(footnotes.items()))
    return out


# --------------------------------------------------------------------------- writers


def group_notes(groups: dict[str, list[str]]) -> list[str]:
    """The note under a table for each report group: what its cells are."""
    return [f"{name}: report group, each cell the mean over {', '.join(members)} within each seed, then mean ± "
            f"std over seeds (the members' own rows are kept); '{INCOMPLETE}': a seed lacks a member's value"
            for name, members in groups.items()]


def _flat_header(table: Table) -> list[str]:
    """Value column labels, prefixed by their group where a table has several."""
    if len(table.groups) < 2:
        return list(table.header)
    labels, i = [], 0
    for group, width in table.groups:
        labels += [f"{group} {h}" for h in table.header[i:i + width]]
        i += width
    return labels


def wrap(text: str, width: int = 110) -> str:
    """A note as lines of at most ``width`` characters (a Markdown paragraph still), so the file fits a screen."""
    return textwrap.fill(text, width, break_long_words=False, break_on_hyphens=False)


def markdown(table: Table, level: int = 0) -> str:
    """A Markdown table: a title line (its group where it has one), bold best cells, notes and footnotes."""
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    def cell(c: Cell) -> str:
        text = f"**{c.text}**" if c.best and c.text else c.text
        return text + c.mark
    title = table.title
    if len(table.groups) == 1 and table.groups[0][0] not in title:
        title = f"{title} · {table.groups[0][0]}" if title else table.groups[0][0]
    out = [f"{'#' * level} {title}" if level else title, ""] if title else []
    out += [line([*table.id_header, *_flat_header(table)]),
            line(["---"] * len(table.id_header) + ["---:"] * len(table.header))]
    out += [line([*r.ids, *map(cell, r.cells)]) for r in table.rows]
    out += [""] + [n for note in table.notes for n in (wrap(note), "")]
    out += [f"{mk} {text}" for mk, text in table.footnotes] + ([""] if table.footnotes else [])
    return "\n".join(out)


_TEX_ESCAPES = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}
_TEX_SYMBOLS = {"±": r"$\pm$", "Δ": r"$\Delta$", "↓": r"$\downarrow$", "↑": r"$\uparrow$", "–": "--", "·": r"$\cdot$"}


def latex_escape(text: str) -> str:
    """Escape LaTeX special characters in plain text (and write ±, Δ, arrows as math)."""
    return "".join(_TEX_ESCAPES.get(ch, _TEX_SYMBOLS.get(ch, ch)) for ch in str(text))


def _tex_mark(mk: str) -> str:
    return "$^{" + "".join(_TEX_MARKS[c] for c in mk) + "}$" if mk else ""


def latex(table: Table) -> str:
    """A booktabs ``tabular`` to ``\\input`` (no float): a group row with ``\\cmidrule`` over each
    dataset's columns, repeated identifiers left blank, ``\\midrule`` between blocks."""
    n_id = len(table.id_header)
    spec = "l" * n_id + "r" * len(table.header)
    out = ["% Generated by mmrepro.report from metrics.json files (needs \\usepackage{booktabs}).",
           *(f"% {latex_escape(note)}" for note in (table.title, *table.notes) if note),
           f"\\begin{{tabular}}{{{spec}}}", "\\toprule"]
    group_cells, rules, col = [""] * n_id, [], n_id + 1
    for group, width in table.groups:
        group_cells.append(f"\\multicolumn{{{width}}}{{c}}{{{latex_escape(group)}}}" if width > 1 else latex_escape(group))
        rules.append(f"\\cmidrule(lr){{{col}-{col + width - 1}}}")
        col += width
    out += [" & ".join(group_cells) + " \\\\", " ".join(rules),
            " & ".join(latex_escape(h) for h in (*table.id_header, *table.header)) + " \\\\", "\\midrule"]
    for i, block in enumerate(table.blocks):
        if i:
            out.append("\\midrule")
        prev: tuple[str, ...] = ()
        for r in block:
            ids = [latex_escape(v) if prev[:j + 1] != r.ids[:j + 1] or j == n_id - 1 else ""
                   for j, v in enumerate(r.ids)]
            prev = r.ids
            cells = [(f"\\textbf{{{latex_escape(c.text)}}}" if c.best and c.text else latex_escape(c.text))
                     + _tex_mark(c.mark) for c in r.cells]
            out.append(" & ".join([*ids, *cells]) + " \\\\")
    out += ["\\bottomrule", "\\end{tabular}"]
    out += [f"\\par{{\\footnotesize {_tex_mark(mk)} {latex_escape(text)}}}" for mk, text in table.footnotes]
    return "\n".join([*out, ""])


def html_page(tables: Sequence[Table], lead: Sequence[str] = ()) -> str:
    """A standalone HTML page of ``tables`` after the paragraphs ``lead`` (the Snakemake report shows it)."""
    body = [f"<p>{html.escape(line)}</p>" for line in lead]
    for table in tables:
        def row(cells: Sequence[str], tag: str) -> str:
            return "<tr>" + "".join(cells) + "</tr>"
        groups = [f'<th colspan="{len(table.id_header)}"></th>'] + [
            f'<th colspan="{w}">{html.escape(g)}</th>' for g, w in table.groups]
        head = [f"<th>{html.escape(h)}</th>" for h in (*table.id_header, *table.header)]
        lines = [f"<h3>{html.escape(table.title)}</h3>" if table.title else "", "<table>", row(groups, "th"),
                 row(head, "th")]
        for r in table.rows:
            cells = [f"<td>{html.escape(v)}</td>" for v in r.ids]
            cells += [f"<td>{'<b>' if c.best else ''}{html.escape(c.text)}{'</b>' if c.best else ''}"
                      f"{html.escape(c.mark)}</td>" for c in r.cells]
            lines.append(row(cells, "td"))
        lines.append("</table>")
        lines += [f"<p>{html.escape(n)}</p>" for n in table.notes]
        lines += [f"<p>{html.escape(mk)} {html.escape(text)}</p>" for mk, text in table.footnotes]
        body += lines
    return "\n".join([
        '<!DOCTYPE html><html><head><meta charset="utf-8"><style>',
        "table{border-collapse:collapse;font:13px sans-serif;margin-bottom:8px}th,td{border:1px solid #ccc;"
        "padding:2px 6px}td{text-align:right}p{font:12px sans-serif}",
        "</style></head><body>", *body, "</body></html>", ""])
