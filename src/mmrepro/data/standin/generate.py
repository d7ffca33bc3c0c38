"""Write every real dataset entry's stand-in under one folder, plus the config overlay that points the
entries at them (``stand_in.yaml``) and a manifest of what was written (``stand_in.json``).

``DIR/<path>`` mirrors the config's ``data_root``-relative ``path`` of each entry (entries that share
a path share one stand-in); Food-101's encoder folders go to ``DIR/encoders/<configured folder's
name>``. The overlay sets, per entry: ``path`` (absolute, so the config's ``data_root`` and the
user's checksum registry stay untouched), ``stand_in: <scale>`` (the mark that the data is random),
for a single-file dataset ``source.sha256`` and ``params.sha256`` (the stand-in's own digest: the
fetch check and the converter enforce it instead of the published one, which a stand-in cannot
match), and for Food-101 the encoder folders. Layer it last:
``snakemake -n --configfile config/paper.yaml DIR/stand_in.yaml``.
"""

from __future__ import annotations

import json
import shutil
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mmrepro.data.standin import food, mmin, sequences, volumes
from mmrepro.data.standin.plan import Scale, Written
from mmrepro.data.store import sha256_file

OVERLAY = "stand_in.yaml"
MANIFEST = "stand_in.json"
#: loader -> the family writing its stand-in: ``(path, entries sharing it, root, scale, rng) -> Written``
FAMILIES: dict[str, Callable[..., Written]] = {
    "mmsa": sequences.write_mmsa, "mult": sequences.write_mult, "iemocap_h5": mmin.write_entry,
    "food101": food.write_entry, "brats": volumes.write_entry,
}
#: loaders that read one file (checksummed), not a folder
FILE_LOADERS = ("mmsa", "mult")


def select(datasets: Mapping[str, Mapping[str, Any]], names: Sequence[str] | None) -> dict[str, list[str]]:
    """Raw path -> the dataset entries reading it, for ``names`` (default: every entry with a real loader)."""
    if names is None:
        names = [n for n, e in datasets.items() if e.get("loader") in FAMILIES]
    by_path: dict[str, list[str]] = {}
    for name in names:
        if name not in datasets:
            raise ValueError(f"unknown dataset {name!r}; the config defines {sorted(datasets)}")
        entry = datasets[name]
        if entry.get("loader") not in FAMILIES:
            raise ValueError(f"dataset {name!r} (loader {entry.get('loader')!r}) has no raw files to stand in for; "
                             f"stand-ins exist for the loaders {sorted(FAMILIES)}")
        rel = entry.get("path")
        if not rel or Path(rel).is_absolute():
            raise ValueError(f"dataset {name!r}: the stand-in mirrors a path relative to data_root, got {rel!r}")
        by_path.setdefault(Path(rel).as_posix(), []).append(name)
    return by_path


def _prepare(out: Path) -> None:
    """``out`` must be new, empty, or an earlier stand-in folder: never a folder of real data."""
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise ValueError(f"{out} holds files and is no stand-in folder (no {MANIFEST}): give a new or empty folder, "
                         "so nothing real is overwritten")
    out.mkdir(parents=True, exist_ok=True)


def _clear(target: Path) -> None:
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()


def generate(datasets: Mapping[str, Mapping[str, Any]], out: Path, scale: Scale, names: Sequence[str] | None = None,
             seed: int = 0, configs: Sequence[str] = ()) -> dict[str, Any]:
    """Write the stand-ins of ``names`` (config entries of ``datasets``) under ``out``; return the manifest.

    Each path's random draws depend only on ``seed`` and the path, so a subset writes the same files.
    """
    out = Path(out).resolve()
    by_path = select(datasets, names)
    _prepare(out)
    began = time.perf_counter()
    written: dict[str, Written] = {}
    for rel, members in by_path.items():
        entries = [datasets[n] for n in members]
        loader = entries[0]["loader"]
        if any(e["loader"] != loader for e in entries):
            raise ValueError(f"datasets {members} read {rel!r} with different loaders")
        _clear(out / rel)
        rng = np.random.default_rng([seed, zlib.crc32(rel.encode())])
        written[rel] = FAMILIES[loader](rel, entries, out, scale, rng)
    digests = {rel: sha256_file(out / rel) for rel, members in by_path.items()
               if datasets[members[0]]["loader"] in FILE_LOADERS}
    manifest = {
        "scale": scale.name, "seed": seed, "root": str(out), "configs": list(configs),
        "max_bytes_per_entry": scale.max_bytes, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - began, 2),
        "bytes": sum(w.bytes for w in written.values()),
        "datasets": {n: rel for rel, members in by_path.items() for n in members},
        "paths": {rel: {**asdict(w), "sha256": digests.get(rel)} for rel, w in written.items()},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    (out / OVERLAY).write_text(overlay_text(datasets, by_path, written, digests, out, scale, configs))
    return manifest


def overlay(datasets: Mapping[str, Mapping[str, Any]], by_path: Mapping[str, list[str]],
            written: Mapping[str, Written], digests: Mapping[str, str], out: Path, scale: Scale) -> dict[str, Any]:
    """The config fragment pointing each entry at its stand-in (see the module docstring)."""
    entries: dict[str, Any] = {}
    for rel, members in by_path.items():
        for name in members:
            entry: dict[str, Any] = {"stand_in": scale.name, "path": str(out / rel)}
            if rel in digests:
                entry["source"] = {"sha256": digests[rel]}
                entry["params"] = {"sha256": digests[rel]}
            for param, folder in written[rel].extra_paths.items():
                entry.setdefault("params", {})[param] = str(out / folder)
            entries[name] = entry
    return {"datasets": entries}


def overlay_text(datasets, by_path, written, digests, out: Path, scale: Scale, configs: Sequence[str]) -> str:
    made_from = " ".join(configs) or "the config"
    header = (f"# STAND-IN DATA: random values in each dataset's real on-disk format ({scale.name} scale), written by\n"
              f"#   mmrepro stand-in --scale {scale.name} --out {out}\n"
              f"# from {made_from}. Nothing trained on it is a result. Layer this file last, e.g.\n"
              f"#   snakemake -n --configfile {made_from} {out / OVERLAY}\n"
              f"# What each file holds (counts, shapes, cuts, assumptions): {out / MANIFEST}\n")
    body = yaml.safe_dump(overlay(datasets, by_path, written, digests, out, scale), sort_keys=False, width=120)
    return header + body
