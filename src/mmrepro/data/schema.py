"""What a dataset promises: its modalities, tasks and splits, and the checks that hold it to that.

Every loader and converter validates arrays against a :class:`DatasetSchema` before anything is
written or trained, and every failure is a :class:`DataValidationError` that names the file, the
split, the key, and what was expected versus what was found. Nothing downstream has to guess.

Two kinds of modality share one store layout (``x/<name>``, one row per sample):

* a **sequence** (``ModalitySpec(name, length, dim)``): ``x/<name>`` float ``(N, length, dim)``,
  padded, with its valid lengths ``len/<name>`` integer ``(N,)``;
* a fixed-shape **array** such as an image or a volume (``ModalitySpec(name, shape=(C, ...))``):
  ``x/<name>`` float ``(N, *shape)``, channel axis first (a single-channel MRI volume is
  ``(1, D, H, W)``, an RGB image ``(3, H, W)``). It has no token length, so no ``len/<name>``.

Three kinds of task: ``regression`` (``y/<task>`` float ``(N,)`` within ``value_range``),
``classification`` (integer ``(N,)`` in ``[0, num_classes)``) and ``segmentation`` (integer
``(N, *shape)`` in ``[0, num_classes)``: one class per voxel/pixel; ``shape`` is the spatial shape,
without the channel axis).

Manifest form (:meth:`DatasetSchema.to_dict`): fields that do not apply are left out, so a
sequence modality is ``{"name", "length", "dim"}`` and a sequence-only dataset's manifest reads
exactly as before arrays were supported; an array modality is ``{"name", "shape"}``; a
segmentation task is ``{"name", "type": "segmentation", "num_classes", "shape", "value_range": null}``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

TASK_TYPES = ("regression", "classification", "segmentation")

_NONFINITE_CHUNK_ELEMENTS = 1 << 22  # values scanned per NaN/inf chunk (about 4 MiB of mask)


class DataValidationError(ValueError):
    """Bad input data; the message says where (file, split, key) and what was expected."""

    def __init__(self, message: str, *, file: str | None = None, split: str | None = None,
                 key: str | None = None):
        where = ", ".join(f"{k}={v}" for k, v in (("file", file), ("split", split), ("key", key)) if v)
        super().__init__(f"{where}: {message}" if where else message)
        self.file, self.split, self.key = file, split, key


def _shape(value: Any, what: str) -> tuple[int, ...]:
    shape = tuple(int(v) for v in value)
    if not shape or any(v <= 0 for v in shape) or any(int(v) != v for v in value):
        raise ValueError(f"{what}: shape must be a non-empty tuple of positive integers, got {value!r}")
    return shape


@dataclass(frozen=True)
class ModalitySpec:
    """One modality: a token sequence ``(N, length, dim)`` padded to ``length``, or (``shape``
    given, ``length``/``dim`` not) a fixed-shape array ``(N, *shape)`` such as an image or volume,
    channel axis first."""

    name: str
    length: int | None = None
    dim: int | None = None
    shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.shape is not None:
            if self.length is not None or self.dim is not None:
                raise ValueError(f"modality {self.name!r}: give either length and dim (a sequence) or shape "
                                 f"(an array), not both")
            object.__setattr__(self, "shape", _shape(self.shape, f"modality {self.name!r}"))
        elif self.length is None or self.dim is None:
            raise ValueError(f"modality {self.name!r}: a sequence needs length and dim (or give shape for an array)")

    @property
    def is_sequence(self) -> bool:
        """True for a token sequence (with lengths ``len/<name>``), False for a fixed-shape array."""
        return self.shape is None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample's ``x/<name>`` row: ``(length, dim)`` or ``shape``."""
        return (self.length, self.dim) if self.shape is None else self.shape

    def to_dict(self) -> dict[str, Any]:
        if self.shape is None:
            return {"name": self.name, "length": self.length, "dim": self.dim}
        return {"name": self.name, "shape": list(self.shape)}


@dataclass(frozen=True)
class TaskSpec:
    """A label set: regression values within ``value_range``, ``num_classes`` classes per sample,
    or (segmentation) ``num_classes`` classes per element of a label map of spatial ``shape``."""

    name: str
    type: str
    value_range: tuple[float, float] | None = None
    num_classes: int | None = None
    shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.type not in TASK_TYPES:
            raise ValueError(f"task {self.name!r}: type must be one of {TASK_TYPES}, got {self.type!r}")
        if self.type in ("classification", "segmentation") and not self.num_classes:
            raise ValueError(f"task {self.name!r}: {self.type} needs num_classes")
        if self.type == "segmentation":
            if self.shape is None:
                raise ValueError(f"task {self.name!r}: segmentation needs the label map's shape")
            object.__setattr__(self, "shape", _shape(self.shape, f"task {self.name!r}"))
        elif self.shape is not None:
            raise ValueError(f"task {self.name!r}: only a segmentation task has a shape")

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample's label: ``()`` or the segmentation map's ``shape``."""
        return self.shape if self.shape is not None else ()

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "type": self.type,
             "value_range": tuple(self.value_range) if self.value_range is not None else None,
             "num_classes": self.num_classes}
        if self.shape is not None:
            d["shape"] = list(self.shape)
        return d

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
            out[f"x/{m.name}"] = ((n, *m.sample_shape), "f")
            if m.is_sequence:
                out[f"len/{m.name}"] = ((n,), "i")
        for t in self.tasks:
            out[t.label_key] = ((n, *t.sample_shape), "f" if t.type == "regression" else "i")
        out["ids"] = ((n,), "U")
        if self.has_present_mask:
            out["present"] = ((n, len(self.modalities)), "b")
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["modalities"] = tuple(m.to_dict() for m in self.modalities)
        d["tasks"] = tuple(t.to_dict() for t in self.tasks)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DatasetSchema":
        def opt_tuple(v):
            return tuple(v) if v else None
        return cls(
            name=d["name"],
            modalities=tuple(ModalitySpec(**{**m, "shape": opt_tuple(m.get("shape"))}) for m in d["modalities"]),
            tasks=tuple(TaskSpec(**{**t, "value_range": opt_tuple(t.get("value_range")),
                                    "shape": opt_tuple(t.get("shape"))}) for t in d["tasks"]),
            splits=tuple(d["splits"]),
            has_present_mask=d.get("has_present_mask", False),
            extra=d.get("extra", {}),
        )


def count_nonfinite(a: np.ndarray, rows_per_chunk: int | None = None) -> int:
    """NaN/inf count of ``a``, scanned in row chunks so a memory-mapped array is never held whole.

    ``rows_per_chunk`` defaults to as many rows as hold about 4 Mi values (at least one row), so a
    split of large volumes is scanned in chunks as small as a split of short sequences.
    """
    if a.ndim == 0:
        return int(not np.isfinite(a))
    if rows_per_chunk is None:
        row = int(np.prod(a.shape[1:], dtype=np.int64))
        rows_per_chunk = max(1, _NONFINITE_CHUNK_ELEMENTS // max(row, 1))
    return sum(int(chunk.size - np.count_nonzero(np.isfinite(chunk)))
               for chunk in (a[i:i + rows_per_chunk] for i in range(0, len(a), rows_per_chunk)))


def validate_split(schema: DatasetSchema, split: str, arrays: dict[str, np.ndarray], *,
                   file: str) -> int:
    """Check one split's arrays against the schema; return its sample count.

    Checks presence of every key, shapes, dtype kinds, NaN/inf in features and labels, label
    ranges (per element for segmentation maps), lengths of sequence modalities within bounds and
    unique ids. The first problem raises, naming where it is.
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
        if not m.is_sequence:
            continue
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
        if t.type in ("classification", "segmentation") and (y.min() < 0 or y.max() >= t.num_classes):
            raise DataValidationError(f"class labels must lie in [0, {t.num_classes - 1}], found [{y.min()}, {y.max()}]",
                                      file=file, split=split, key=t.label_key)
    if len(set(arrays["ids"].tolist())) != n:
        raise DataValidationError("sample ids are not unique", file=file, split=split, key="ids")
    return n
