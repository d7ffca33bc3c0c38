"""Wall-clock phases of one job, so its fixed cost (start-up, setup, tracking) can be told from compute.

A job calls :meth:`Phases.lap` at the end of each phase; the first lap also counts the time since
the process started (interpreter start and imports). The phases go to ``timings.json`` beside the
run's results (never into ``metrics.json``, which stays deterministic) and to the job's log, and
``benchmarks/job_overhead.py`` reads them. ``timings.json`` also holds the job's wall-clock
``start`` and ``end`` (Unix seconds): a deferred run is logged to MLflow later, and takes its
start and end, hence its Duration, from them (:func:`mmrepro.tracking.ingest_runs`).
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)

#: Phases that are the job's real work; every other phase is fixed cost.
COMPUTE = ("train", "evaluate", "adapt")


def process_age() -> float:
    """Seconds since this process started (Linux: from /proc; elsewhere 0, i.e. start-up is not counted)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


class Phases:
    """``phases.lap("setup")`` records the time since the previous lap (or since the process started)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._since_start = process_age()
        self._last = time.perf_counter()
        self.start = time.time() - self._since_start

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        spent = now - self._last + self._since_start
        self._since_start, self._last = 0.0, now
        self.seconds[name] = self.seconds.get(name, 0.0) + spent

    def summary(self) -> dict[str, float]:
        """Seconds per phase, plus ``fixed`` (everything but compute) and ``total``; and the wall-clock
        ``start`` (the process's) and ``end`` (now) in Unix seconds."""
        out = {k: round(v, 3) for k, v in self.seconds.items()}
        out["total"] = round(sum(self.seconds.values()), 3)
        out["fixed"] = round(sum(v for k, v in self.seconds.items() if k not in COMPUTE), 3)
        log.info("phases (s): %s", " ".join(f"{k}={v:.2f}" for k, v in out.items()))
        return {**out, "start": round(self.start, 3), "end": round(time.time(), 3)}
