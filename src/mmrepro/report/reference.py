"""The papers' reported numbers, translated into our names, for the tables' paper columns.

A study's reference is ``config/reference/<study>.csv`` (a copy of the specs' CSV, its columns
kept: paper, table, dataset, condition, method, method_label, metric, value, provenance, note) read
through ``config/reference/names.yaml``, the one place where the paper's dataset, condition,
method and metric names become ours. Numbers are only ever read from the CSV; values are kept as
printed (``"70.26*"``) for display, and as a number in our units for the difference.

A value whose provenance is not the paper itself, or that carries a note or a caveat of the
mapping, gets a footnote text; the table writer turns distinct texts into marks.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

__all__ = ["REFERENCE_COLUMNS", "CSV_COLUMNS", "Reference", "StudyNames", "load_reference", "reference_frame"]

#: Columns of a reference frame, in our names: ``value`` in our units (a fraction where the paper
#: prints %), ``printed`` as the paper prints it, ``scale`` = paper units per our unit (100 for
#: %), ``footnote`` = "" for a value read from the paper itself. A blank ``setting`` applies to
#: every setting of that dataset and method.
REFERENCE_COLUMNS = ("dataset", "setting", "method", "metric", "value", "printed", "scale", "footnote")
#: Columns of the papers' CSVs (specs/reference/*.csv).
CSV_COLUMNS = ("paper", "table", "dataset", "condition", "method", "method_label", "metric", "value",
               "provenance", "note")
_NUMBER = re.compile(r"\s*([-+]?(?:\d+\.?\d*|\.\d+))")
_PRIMARY = "primary"


@dataclass(frozen=True)
class StudyNames:
    """One study's entry of names.yaml (see the file's header for each key)."""

    paper: str
    absent: str = ""
    datasets: dict[str, str] = field(default_factory=dict)
    conditions: dict[str, str] = field(default_factory=dict)
    methods: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, str] = field(default_factory=dict)
    percent: tuple[str, ...] = ()
    per_dataset: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)
    caveats: tuple[dict[str, Any], ...] = ()

    @classmethod
    def from_file(cls, path: str | os.PathLike, study: str) -> "StudyNames":
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if study not in doc:
            raise ValueError(f"{path}: no entry for study {study!r} (have {sorted(doc)})")
        entry = dict(doc[study])
        unknown = set(entry) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: {study}: unknown keys {sorted(unknown)}")
        if "paper" not in entry:
            raise ValueError(f"{path}: {study}: missing key 'paper'")
        for key in ("percent", "caveats"):
            entry[key] = tuple(entry.get(key) or ())
        for key in ("datasets", "conditions", "methods", "metrics", "per_dataset"):
            entry[key] = dict(entry.get(key) or {})
        return cls(**entry)

    def _for(self, kind: str, dataset: str) -> dict[str, str]:
        return {**getattr(self, kind), **self.per_dataset.get(dataset, {}).get(kind, {})}

    def translate(self, row: dict[str, str], where: str) -> dict[str, Any]:
        """One CSV row (paper names) -> one reference row (our names, our units)."""
        ds = row["dataset"]
        metrics = self._for("metrics", ds)
        if row["metric"] not in metrics:
            raise ValueError(f"{where}: metric {row['metric']!r} of dataset {ds!r} has no mapping in names.yaml")
        match = _NUMBER.match(row["value"])
        if match is None:
            raise ValueError(f"{where}: value {row['value']!r} is not a number")
        scale = 100.0 if row["metric"] in self.percent else 1.0
        notes = [] if row["provenance"].startswith(_PRIMARY) else [row["provenance"]]
        notes += [row["note"]] if row["note"] else []
        notes += [c["text"] for c in self.caveats
                  if ds in c.get("datasets", [ds]) and row["metric"] in c.get("metrics", [row["metric"]])]
        return {
            "dataset": self.datasets.get(ds, ds),
            "setting": self._for("conditions", ds).get(row["condition"], row["condition"]),
            "method": self.methods.get(row["method"], row["method"]),
            "metric": metrics[row["metric"]],
            "value": float(match.group(1)) / scale,
            "printed": row["value"].strip(),
            "scale": scale,
            "footnote": "; ".join(notes),
        }


@dataclass(frozen=True)
class Reference:
    """A study's paper numbers in our names (``frame``: :data:`REFERENCE_COLUMNS`)."""

    frame: pd.DataFrame
    paper: str = ""
    absent: str = ""


def load_reference(csv_path: str | os.PathLike, names_path: str | os.PathLike, study: str) -> Reference:
    """Read a paper CSV through names.yaml; errors name the file, line and column."""
    names = StudyNames.from_file(names_path, study)
    table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    if tuple(table.columns) != CSV_COLUMNS:
        raise ValueError(f"{csv_path}: columns must be {list(CSV_COLUMNS)}, got {list(table.columns)}")
    rows = [names.translate(r, f"{csv_path}:{i + 2}") for i, r in enumerate(table.to_dict("records"))]
    frame = pd.DataFrame(rows, columns=list(REFERENCE_COLUMNS))
    key = ["dataset", "setting", "method", "metric"]
    dup = frame.duplicated(key, keep=False)
    if dup.any():
        raise ValueError(f"{csv_path}: several values map to {frame[dup].iloc[0][key].tolist()} (names.yaml)")
    return Reference(frame, paper=names.paper, absent="" if rows else names.absent)


def reference_frame(reference: "Reference | pd.DataFrame") -> pd.DataFrame:
    """A :class:`Reference`'s frame, or a plain frame (dataset, method, metric, value [, setting,
    printed, scale, footnote]) completed with the defaults: any setting, our units, the paper itself."""
    if isinstance(reference, Reference):
        return reference.frame
    need = {"dataset", "method", "metric", "value"}
    if not need <= set(reference.columns):
        raise ValueError(f"reference needs columns {sorted(need)} (+ optional setting, printed, scale, footnote), "
                         f"got {list(reference.columns)}")
    frame = reference.copy()
    for col, default in (("setting", ""), ("printed", ""), ("scale", 1.0), ("footnote", "")):
        if col not in frame.columns:
            frame[col] = default
    frame["setting"] = ["" if s is None or (isinstance(s, float) and math.isnan(s)) else str(s)
                        for s in frame["setting"]]
    frame[["printed", "footnote"]] = frame[["printed", "footnote"]].fillna("").astype(str)
    return frame[list(REFERENCE_COLUMNS)]
