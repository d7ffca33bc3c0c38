"""Datasets reported as one (``studies.<study>.report_groups``).

Why: a paper may report one cell for what we run as several datasets; MPLMM's IEMOCAP cell is the
mean of four one-vs-rest emotion tasks, each its own dataset entry here. :func:`add_groups` appends
rows named after the group to the runs frame of :func:`~mmrepro.report.tables.load_runs`: per
(method, setting, seed, split, metric) the mean over the members' values. The tables then take
mean ± std over seeds of these per-seed means, so a group cell is "within a seed first, then over
seeds", and the members keep their own rows. Where a member lacks that run or value, the group's
value is NaN: the tables print "incomplete" instead of a mean over fewer members.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

__all__ = ["ReportGroup", "parse_groups", "add_groups", "INCOMPLETE"]

#: What a table prints for a group cell that some seed's member lacks.
INCOMPLETE = "incomplete"


@dataclass(frozen=True)
class ReportGroup:
    """One reported group: its row name and the datasets it averages."""

    name: str
    members: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.members or len(set(self.members)) != len(self.members):
            raise ValueError(f"report group {self.name!r}: members must be distinct and at least one, got "
                             f"{list(self.members)}")
        if self.name in self.members:
            raise ValueError(f"report group {self.name!r}: its name is one of its members")


def parse_groups(mapping: Mapping[str, Sequence[str]] | None) -> tuple[ReportGroup, ...]:
    """A study's ``report_groups`` (group -> member datasets) as typed groups."""
    return tuple(ReportGroup(str(name), tuple(members)) for name, members in (mapping or {}).items())


def add_groups(runs: pd.DataFrame, groups: Sequence[ReportGroup]) -> pd.DataFrame:
    """``runs`` plus one row per group, method, setting, seed, split and metric (see the module doc).

    A group row's ``value`` is the mean of its members' values (NaN where a member lacks one);
    ``trainable_params``/``backbone_params`` are the members' means (equal for tasks on the same
    features); ``path`` is a member's (the tables read its total parameter count); oracle and
    ceiling are NaN. ``attrs["groups"]`` maps each group to its members, for the tables' notes.
    Raises ``ValueError`` when a group's members disagree on the task or a member's run appears twice.
    """
    out = [runs]
    key = ["method", "setting", "seed", "split", "metric"]
    for group in groups:
        df = runs[runs["dataset"].isin(group.members)]
        if df.empty:
            continue
        tasks = sorted(set(df["task"]))
        if len(tasks) > 1:
            raise ValueError(f"report group {group.name!r}: its members' runs have different tasks {tasks}")
        dup = df.duplicated([*key, "dataset"], keep=False)
        if dup.any():
            d = df[dup].iloc[0]
            raise ValueError(f"report group {group.name!r}: run {d['dataset']}/{d['method']}/{d['setting']}/seed "
                             f"{d['seed']} appears more than once (several studies mixed?)")
        values = df.set_index([*key, "dataset"])["value"].unstack("dataset").reindex(columns=list(group.members))
        first = df.groupby(key, sort=False).agg(study=("study", "first"), task=("task", "first"),
                                                backbone=("backbone", "first"), path=("path", "first"),
                                                trainable_params=("trainable_params", "mean"),
                                                backbone_params=("backbone_params", "mean"))
        rows = first.join(values.mean(axis=1, skipna=False).rename("value")).reset_index()
        rows["trainable_params"] = rows["trainable_params"].round().astype("int64")
        out.append(rows.assign(dataset=group.name, oracle=math.nan, ceiling=math.nan)[list(runs.columns)])
    frame = pd.concat(out, ignore_index=True).astype(runs.dtypes.to_dict())
    frame.attrs = {**runs.attrs, "groups": {g.name: list(g.members) for g in groups}}
    return frame
