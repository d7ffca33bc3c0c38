"""How many samples a stand-in holds, and what each family reports back once it has written them.

``tiny`` keeps a handful per split (every class at least once); ``full`` keeps the real counts,
cut in proportion when the written files would pass the per-entry byte budget (``max_bytes``), or to
a share of them (``fraction``: real shapes, few samples, as ``benchmarks/paper_cost.py`` needs): a
corpus cut that way says so, with its real size, so whoever measures cost on it can scale.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCALES = ("tiny", "full")
#: full scale's default budget per dataset entry: about 17 GB for the whole of config/paper.yaml
FULL_MAX_BYTES = 2 * 10**9


@dataclass(frozen=True)
class Scale:
    """``name``: tiny or full; ``max_bytes``: full's budget per dataset entry (None: none); ``progress``: bars;
    ``fraction``: full's share of the real counts written in every split (1: all of them)."""

    name: str
    max_bytes: int | None = None
    progress: bool = True
    fraction: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {self.name!r}")
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive or None, got {self.max_bytes}")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction must lie in (0, 1], got {self.fraction}")

    @property
    def tiny(self) -> bool:
        return self.name == "tiny"


@dataclass
class Counts:
    """Samples written per split, the real counts, and why they differ (None: they do not)."""

    written: dict[str, int]
    real: dict[str, int]
    cut: str | None = None


@dataclass
class Written:
    """What one raw path's stand-in holds: for the manifest beside the files."""

    path: str                         # relative to the stand-in root, as the config's data_root-relative path
    counts: Counts
    shapes: dict[str, Any]            # what the loader will find: widths, lengths, volume shapes
    assumptions: list[str] = field(default_factory=list)
    extra_paths: dict[str, str] = field(default_factory=dict)   # e.g. encoder folders: param -> relative path
    bytes: int = 0
    seconds: float = 0.0


def allocate(total: int, weights: Sequence[float], minimum: int = 0) -> list[int]:
    """``total`` split over ``weights`` by largest remainder, each part at least ``minimum``."""
    if total < minimum * len(weights):
        raise ValueError(f"{total} cannot give {len(weights)} parts at least {minimum} each")
    spare = total - minimum * len(weights)
    s = float(sum(weights))
    raw = [spare * w / s for w in weights]
    parts = [math.floor(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: parts[i] - raw[i])[:spare - sum(parts)]:
        parts[i] += 1
    return [p + minimum for p in parts]


def choose_counts(scale: Scale, real: Mapping[str, int], tiny: Mapping[str, int],
                  bytes_per_sample: float) -> Counts:
    """Tiny counts, or the real ones, cut by one factor over every split: ``scale.fraction`` of them, less
    when they pass ``max_bytes``."""
    real = dict(real)
    if scale.tiny:
        return Counts(dict(tiny), real, "tiny scale: a handful per split")
    need = bytes_per_sample * sum(real.values())
    factor = min(scale.fraction, 1.0 if scale.max_bytes is None else scale.max_bytes / need)
    if factor >= 1.0:
        return Counts(dict(real), real)
    if factor == scale.fraction:
        written = {s: max(1, math.ceil(n * factor)) for s, n in real.items()}
        return Counts(written, real, f"cut to {factor:.2%} of the real counts in every split (fraction): real shapes, "
                                     "fewer samples")
    written = {s: max(1, int(n * factor)) for s, n in real.items()}
    return Counts(written, real, f"cut to {factor:.1%} of the real counts in every split: the real files take about "
                                 f"{need / 1e9:.1f} GB, over the {scale.max_bytes / 1e9:.1f} GB budget per entry")


def folder_bytes(path: Path) -> int:
    """Bytes of every file under ``path`` (or of the file itself)."""
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
