"""Every report figure fits its canvas: titles, legends, labels and tick labels inside, ticks apart.

Why: a constrained layout moves axes to make room for their labels, but a title or a figure
legend wider than the figure, or crowded tick labels, still end outside the canvas or on each
other. :func:`save` therefore rotates crowded x tick labels and widens (or heightens) the
figure until :func:`outside` finds nothing, then writes it as png and pdf. :func:`outside` and
:func:`overlapping_ticks` are what the tests check on each saved figure.
"""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.text import Text

from .marking import mark_figure
from .tables import _atomic_write, _with_suffix

__all__ = ["outside", "overlapping_ticks", "fit", "save", "legend_columns"]

_DPI = 150
_TOLERANCE_PX = 1.0


def _drawn(axis) -> list[Text]:
    """The axis' major tick labels that are drawn: those with text at a tick inside the view limits
    (matplotlib keeps labels for ticks just outside them, never drawn)."""
    lo, hi = sorted(axis.get_view_interval())
    eps = 1e-9 * max(hi - lo, 1e-300)
    return [label for loc, label in zip(axis.get_majorticklocs(), axis.get_majorticklabels())
            if lo - eps <= loc <= hi + eps and label.get_visible() and label.get_text()]


def _shown_texts(fig: Figure) -> list[tuple[str, object]]:
    """(description, artist) for every visible text and legend of the figure."""
    out: list[tuple[str, object]] = [(f"figure text {t.get_text()!r}", t) for t in fig.texts]
    out += [(f"figure legend {i}", leg) for i, leg in enumerate(fig.legends)]
    for ax in fig.axes:
        out.append((f"title {ax.title.get_text()!r}", ax.title))
        out += [(f"axis label {t.get_text()!r}", t) for t in (ax.xaxis.label, ax.yaxis.label)]
        out += [(f"tick label {t.get_text()!r}", t) for t in (*_drawn(ax.xaxis), *_drawn(ax.yaxis))]
        out += [(f"text {t.get_text()!r}", t) for t in ax.texts]
        if ax.get_legend() is not None:
            out.append((f"legend of {ax.get_title()!r}", ax.get_legend()))
    return [(d, a) for d, a in out if a.get_visible() and (not isinstance(a, Text) or a.get_text())]


def outside(fig: Figure) -> list[str]:
    """The texts and legends whose drawn extent leaves the figure's canvas (empty: all fit)."""
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    bad = []
    for desc, artist in _shown_texts(fig):
        ext = artist.get_window_extent(renderer)
        if (ext.x0 < box.x0 - _TOLERANCE_PX or ext.x1 > box.x1 + _TOLERANCE_PX
                or ext.y0 < box.y0 - _TOLERANCE_PX or ext.y1 > box.y1 + _TOLERANCE_PX):
            bad.append(desc)
    return bad


def _overlaps(labels: list[Text], renderer) -> list[str]:
    boxes = [t.get_window_extent(renderer) for t in labels]
    return [f"{labels[i].get_text()!r} / {labels[j].get_text()!r}" for i in range(len(boxes))
            for j in range(i + 1, len(boxes)) if boxes[i].overlaps(boxes[j])]


def overlapping_ticks(fig: Figure) -> list[str]:
    """Pairs of drawn x or y tick labels of one axes that overlap on the canvas (empty: none)."""
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    return [pair for ax in fig.axes for axis in (ax.xaxis, ax.yaxis) for pair in _overlaps(_drawn(axis), renderer)]


def fit(fig: Figure, rounds: int = 8) -> Figure:
    """Set crowded x tick labels apart (rotated 45°, then 90°, then a wider figure), then grow the
    figure by what sticks out of it until everything fits."""
    fig.set_dpi(_DPI)
    for _ in range(rounds):
        fig.draw_without_rendering()
        renderer = fig.canvas.get_renderer()
        crowded = [ax for ax in fig.axes if _overlaps(_drawn(ax.xaxis), renderer)]
        if not crowded:
            break
        for ax in crowded:
            rotation = ax.xaxis.get_majorticklabels()[0].get_rotation() if ax.xaxis.get_majorticklabels() else 0
            if rotation < 90:
                ax.tick_params(axis="x", labelrotation=45 if rotation < 45 else 90)
                for t in ax.get_xticklabels():
                    t.set_horizontalalignment("right" if rotation < 45 else "center")
            else:
                w, h = fig.get_size_inches()
                fig.set_size_inches(w * 1.3, h)
    for _ in range(rounds):
        fig.draw_without_rendering()
        if not outside(fig):
            break
        tight = fig.get_tightbbox(fig.canvas.get_renderer())  # inches
        w, h = fig.get_size_inches()
        grow_w = max(0.0, -tight.x0) + max(0.0, tight.x1 - w)
        grow_h = max(0.0, -tight.y0) + max(0.0, tight.y1 - h)
        fig.set_size_inches(w + 2 * grow_w + 0.1, h + 2 * grow_h + (0.1 if grow_h else 0.0))
    return fig


def legend_columns(labels: list[str], width_in: float, fontsize: float = 8.0) -> int:
    """How many legend columns of ``labels`` fit ``width_in`` inches (at least one); :func:`fit`
    widens the figure if an estimate falls short."""
    entry_in = (max(map(len, labels), default=1) * 0.55 * fontsize + 30) / 72
    return max(1, min(len(labels), int(width_in / entry_in)))


def save(fig: Figure, stem: str | os.PathLike) -> list[Path]:
    """Fit ``fig`` (:func:`fit`) and write ``stem.png`` and ``stem.pdf`` atomically; returns the two paths.
    A figure of runs on stand-in data is titled so first (:mod:`.marking`)."""
    mark_figure(fig)
    fit(fig)
    paths = [_with_suffix(Path(stem), ".png"), _with_suffix(Path(stem), ".pdf")]
    for path in paths:
        _atomic_write(path, lambda fh, fmt=path.suffix[1:]: fig.savefig(fh, format=fmt, dpi=_DPI))
    return paths
