"""A report built from runs on random stand-in data says so in the title of every file it writes.

The runs say it themselves (``stand_in`` in ``metrics.json``, from the dataset entry's mark through
the run spec), so nothing has to remember to pass a flag: a report verb opens :func:`marked` with
:func:`stand_in_title` of its inputs, and while it is open the writers of :mod:`.tables` put the
title first in every text file (a heading in Markdown and HTML, a comment line in CSV and LaTeX)
and above every figure.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

TITLE = "REHEARSAL on random stand-in data ({scales}): not a result"
#: The ``metrics.json`` key naming a run's stand-in scale (absent on real data).
REHEARSAL_KEY = "stand_in"

_TITLE: contextvars.ContextVar[str | None] = contextvars.ContextVar("stand_in_title", default=None)


def title_for(scales: Iterable[str | None]) -> str | None:
    """The rehearsal title for runs of these stand-in scales (None entries: real data), or None."""
    found = sorted({s for s in scales if s})
    return TITLE.format(scales=", ".join(found)) if found else None


def stand_in_title(metrics_paths: Iterable[str | os.PathLike]) -> str | None:
    """The title of a report on these runs' ``metrics.json``: None when every run read real data."""
    return title_for(json.loads(Path(p).read_text()).get(REHEARSAL_KEY) for p in metrics_paths)


@contextlib.contextmanager
def marked(title: str | None) -> Iterator[None]:
    """Every report file written inside carries ``title`` (nothing changes for None)."""
    token = _TITLE.set(title)
    try:
        yield
    finally:
        _TITLE.reset(token)


def current() -> str | None:
    return _TITLE.get()


def mark_text(path: Path, text: str) -> str:
    """``text`` of the file ``path`` with the current title first, in the file format's own way."""
    title = current()
    if title is None:
        return text
    suffix = Path(path).suffix
    if suffix == ".html":
        heading = f"<h2 style=\"color:#b22222;font:bold 15px sans-serif\">{title}</h2>"
        return text.replace("<body>", "<body>" + heading, 1) if "<body>" in text else heading + "\n" + text
    if suffix in (".csv", ".tsv"):
        return f"# {title}\n{text}"
    if suffix == ".tex":
        return f"% {title}\n{text}"
    return f"**{title}**\n\n{text}"


def mark_figure(fig) -> None:
    """Put the current title first in ``fig``'s suptitle (a layout engine keeps it clear of the axes)."""
    title = current()
    if title is None:
        return
    above = fig.get_suptitle()
    fig.suptitle(f"{title}\n{above}" if above else title, color="firebrick")
    if fig.get_layout_engine() is None:
        fig.set_layout_engine("tight")
