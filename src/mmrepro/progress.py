"""When to show progress bars: on a terminal, never under CI (kept free of heavy imports)."""

from __future__ import annotations

import os


def progress_disabled() -> bool | None:
    """``True`` under CI; ``None`` lets tqdm show the bar only when stderr is a terminal."""
    return True if os.environ.get("CI") else None
