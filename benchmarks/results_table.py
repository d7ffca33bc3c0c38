"""The benchmarks' one way to write a table of result rows: CSV and Markdown under an output folder."""

from __future__ import annotations

import csv
import io
from pathlib import Path


def markdown(rows: list[dict], columns: list[str]) -> str:
    out = io.StringIO()
    out.write("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n")
    for r in rows:
        out.write("| " + " | ".join(str(r[c]) for c in columns) + " |\n")
    return out.getvalue()


def write_results(rows: list[dict], columns: list[str], out: Path, stem: str, title: str) -> str:
    """Write ``<out>/<stem>.csv`` and ``.md`` (titled ``title``); return the Markdown text."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    text = f"{title}\n\n" + markdown(rows, columns)
    (out / f"{stem}.md").write_text(text)
    return text
