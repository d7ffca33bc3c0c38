"""One exclusive lock per shared file, across processes: Snakemake runs jobs in parallel that update
the same small JSON files (the checksum registry, the stand-in manifest)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

try:  # POSIX: serialise writers across processes
    import fcntl
except ImportError:  # elsewhere writers still replace files atomically, only not locked
    fcntl = None  # type: ignore[assignment]


@contextlib.contextmanager
def exclusive(path: Path | str) -> Iterator[None]:
    """Hold the exclusive lock of ``path`` (on ``<path>.lock``; blocks while another process holds it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)
