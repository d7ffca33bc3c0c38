"""What a dataset promises: its modalities, tasks and splits, and the checks that hold it to that.

Every loader and converter validates arrays against a :class:`DatasetSchema` before anything is
written or trained, and every failure is a :class:`DataValidationError` that names the file, the
split, the key, and what was expected versus what was found. Nothing downstream has to guess.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

TASK_TYPES = ("regression", "classification")


class DataValidationError(ValueError):
    """Bad input data; the message says where (file, split, key) and what was expected."""

    def __init__(self, message: str, *, file: str | None = None, split: str | None = None,
                 key: str | None = None):
        where = ", ".join(f"{k}={v}" for k, v in (("file", file), ("split", split), ("key", key)) if v)
        super().__init__(f"{where}: {message}" if where else message)
        self.file, self.split, self.key = file, split, key


@dataclass(frozen=True)
class ModalitySpec:
    """One modality stored as a token sequence ``(N, length, dim)`` padded to ``length``."""

    name: str
    length: int
    dim: int


@dataclass(frozen=True)
class TaskSpec:
    """A label set: regression values within ``value_range`` or ``num_classes`` classes."""

    name: str
    type: str
    value_range: tuple[float, float] | None = None
    num_classes: int | None = None

    def __post_init__(self) -> None:
        if self.type not in TASK_TYPES:
            raise ValueError(f"task {self.name!r}: type must be one of {TASK_TYPES}, got {self.type!r}")
        if self.type == "classification" and not self.num_classes:
            raise ValueError(f"task {self.name!r}: classification needs num_classes")

    @property
    def label_key(self) -> str:
        """Name of the label array of this task inside a split."""
        return f"y/{self.name}"


@dataclass(frozen=True)
class DatasetSchema:
    """Modalities, tasks and split names of one dataset, as stored in its manifest."""

    name: str
    modalities: tuple[ModalitySpec, ...]
    tasks: tuple[TaskSpec, ...]
    splits: tuple[str, ...]
    has_present_mask: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def modality_names(self) -> list[str]:
        return [m.name for m in self.modalities]

    def modality(self, name: str) -> ModalitySpec:
        for m in self.modalities:
            if m.name == name:
                return m
        raise KeyError(f"dataset {self.name!r} has no modality {name!r}; it has {self.modality_names}")

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"dataset {self.name!r} has no task {name!r}; it has {[t.name for t in self.tasks]}")

    def expected_arrays(self, n: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """Key -> (shape, dtype kind) of every array a split of ``n`` samples must hold."""
        out: dict[str, tuple[tuple[int, ...], str]] = {}
        for m in self.modalities:
            out[f"x/{m.name}"] = ((n, m.length, m.dim), "f")
            out[f"len/{m.name}"] = ((n,), "i")
        for t in self.tasks:
            out[t.label_key] = ((n,), "f" if t.type == "regression" else "i")
        out["ids"] = ((n,), "U")
        if self.has_present_mask:
            out["present"] = ((n, len(self.modalities)), "b")
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DatasetSchema":
        return cls(
            name=d["name"],
            modalities=tuple(ModalitySpec(**m) for m in d["modalities"]),
            tasks=tuple(TaskSpec(**{**t, "value_range": tuple(t["value_range"]) if t.get("value_range") else None})
                        for t in d["tasks"]),
            splits=tuple(d["splits"]),
            has_present_mask=d.get("has_present_mask", False),
            extra=d.get("extra", {}),
        )


def count_nonfinite(a: np.ndarray, rows_per_chunk: int = 256) -> int:
    """NaN/inf count of ``a``, scanned in row chunks so a memory-mapped array is never held whole."""
    if a.ndim == 0:
        return int(not np.isfinite(a))
    return sum(int(chunk.size - np.count_nonzero(np.isfinite(chunk)))
               for chunk in (a[i:i + rows_per_chunk] for i in range(0, len(a), rows_per_chunk)))


def validate_split(schema: DatasetSchema, split: str, arrays: dict[str, np.ndarray], *,
                   file: str) -> int:
    """Check one split's arrays against the schema; return its sample count.

    Checks presence of every key, shapes, dtype kinds, NaN/inf in features and labels, label
    ranges, lengths within bounds and unique ids. The first problem raises, naming where it is.
    """
    if "ids" not in arrays:
        raise DataValidationError("missing array (expected sample ids)", file=file, split=split, key="ids")
    n = len(arrays["ids"])
    for key, (shape, kind) in schema.expected_arrays(n).items():
        if key not in arrays:
            raise DataValidationError(f"missing array (expected shape {shape})", file=file, split=split, key=key)
        a = arrays[key]
        if tuple(a.shape) != shape:
            raise DataValidationError(f"expected shape {shape}, found {tuple(a.shape)}",
                                      file=file, split=split, key=key)
        if a.dtype.kind != kind and not (kind == "i" and a.dtype.kind == "u"):
            raise DataValidationError(f"expected dtype kind {kind!r}, found {a.dtype}",
                                      file=file, split=split, key=key)
        if kind == "f":
            bad = count_nonfinite(a)
            if bad:
                raise DataValidationError(f"{bad} NaN/inf value(s) found", file=file, split=split, key=key)
    for m in schema.modalities:
        lengths = arrays[f"len/{m.name}"]
        if n and (lengths.min() < 0 or lengths.max() > m.length):
            raise DataValidationError(f"lengths must lie in [0, {m.length}], found [{lengths.min()}, {lengths.max()}]",
                                      file=file, split=split, key=f"len/{m.name}")
    for t in schema.tasks:
        y = arrays[t.label_key]
        if not n:
            continue
        if t.type == "regression" and t.value_range is not None:
            lo, hi = t.value_range
            if y.min() < lo or y.max() > hi:
                raise DataValidationError(f"labels must lie in [{lo}, {hi}], found [{y.min():.4g}, {y.max():.4g}]",
                                          file=file, split=split, key=t.label_key)
        if t.type == "classification" and (y.min() < 0 or y.max() >= t.num_classes):
            raise DataValidationError(f"class labels must lie in [0, {t.num_classes - 1}], found [{y.min()}, {y.max()}]",
                                      file=file, split=split, key=t.label_key)
    if len(set(arrays["ids"].tolist())) != n:
        raise DataValidationError("sample ids are not unique", file=file, split=split, key="ids")
    return n
