"""What a config's grid costs: its distinct job types, and one job's time multiplied out from measured steps.

A job type is (kind, study, data, backbone, method family): ``kind`` is the rule that runs it
(``backbone``, ``train`` or ``adapt``), ``data`` the raw file or folder the job reads (dataset entries
sharing one, such as IEMOCAP's four emotion views, are one type: same shapes, same counts), the
family the method with its variants resolved (``cggm_magnitude`` is ``cggm``). Every job of the grid
(seeds, settings, entries, and search trials) belongs to exactly one type, so measuring one job of
each type and multiplying by :func:`job_seconds` prices the whole grid. ``benchmarks/paper_cost.py``
does the measuring.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from mmrepro.config import (STUDY_KINDS, backbone_runs, backbone_source, dataset_path, expand_variants, search_run,
                            study_grid, target_dataset, tuned_methods)

KINDS = ("backbone", "train", "adapt")


@dataclass
class JobType:
    """One type of job and every job of the grid that is of it (``runs``: study_grid / backbone_runs
    dicts, with ``data``, the entry the job reads, added; a search trial is one more run)."""

    kind: str
    study: str
    data: str            # the raw path (or entry name, for a dataset without one) the job reads
    backbone: str | None
    family: str
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def key(self) -> str:
        return "/".join(p for p in (self.kind, self.study, self.dataset, self.backbone, self.family) if p)

    @property
    def dataset(self) -> str:
        """The representative entry (the first run's): the one measured."""
        return self.runs[0]["data"]

    @property
    def first(self) -> dict[str, Any]:
        return self.runs[0]


def _data_key(config: dict[str, Any], dataset: str) -> str:
    return dataset_path(config, dataset) or dataset


def job_types(config: dict[str, Any], studies: Iterable[str] | None = None) -> list[JobType]:
    """Every job type of ``studies`` (default: every study with datasets), in grid order."""
    types: dict[tuple, JobType] = {}

    def add(kind: str, study: str, data: str, run: dict[str, Any], family: str) -> None:
        key = (kind, study, _data_key(config, data), run.get("backbone"), family)
        types.setdefault(key, JobType(kind, study, key[2], run.get("backbone"), family)).runs.append(
            {**run, "data": data})

    names = [s for s, c in config["studies"].items() if c.get("datasets")] if studies is None else list(studies)
    for study in names:
        kind = STUDY_KINDS[study]
        for start in backbone_runs(config, study):
            add("backbone", study, backbone_source(config, study, start["dataset"]), start, "joint")
        for run in study_grid(config, study):
            data = (target_dataset(config, study, run["dataset"], run["setting"]) if kind == "adapt"
                    else run["dataset"])
            add("adapt" if kind == "adapt" else "train", study, data, run, expand_variants(config, run["method"])[0])
        trials = config.get("tune", {}).get("trials", 0)
        for method in tuned_methods(config, study):
            for dataset in config["studies"][study]["datasets"]:
                run = {**search_run(config, study, dataset, method), "trial": True}
                data = target_dataset(config, study, dataset, run["setting"]) if kind == "adapt" else dataset
                for _ in range(trials):
                    add("adapt" if kind == "adapt" else "train", study, data, run,
                        expand_variants(config, method)[0])
    return list(types.values())


@dataclass(frozen=True)
class StepCost:
    """What one measured job of a type says, at the stand-in's sizes.

    ``step_s``: one optimizer step; ``epoch_extra_s``: the rest of one epoch (validation, the method's
    end-of-epoch work) on ``written`` samples; ``final_s``: the job's last evaluation (and adaptation,
    for an adapt job) on ``written`` samples; ``fixed_s``: start-up, setup, tracking and saving, which
    do not grow with the data.
    """

    step_s: float
    epoch_extra_s: float
    final_s: float
    fixed_s: float
    written: int


def job_seconds(cost: StepCost, real: int, epochs: int, steps_per_epoch: int) -> float:
    """One real job's seconds: ``epochs`` of ``steps_per_epoch`` steps, the per-epoch and final work
    grown from ``cost.written`` to ``real`` samples (linear: both are passes over the data), plus the
    fixed cost. An adapt job has no steps (its passes over the target are in ``final_s``)."""
    grow = real / cost.written
    return epochs * (steps_per_epoch * cost.step_s + cost.epoch_extra_s * grow) + cost.final_s * grow + cost.fixed_s


def steps_per_epoch(train_samples: int, batch_size: int) -> int:
    """Optimizer steps of one epoch over ``train_samples`` (the last batch may be short)."""
    return max(1, math.ceil(train_samples / batch_size))
