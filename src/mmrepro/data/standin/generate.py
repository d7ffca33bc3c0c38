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
import os
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
from mmrepro.locking import exclusive

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


def _claim(out: Path) -> None:
    """``out`` must be new, hold no file (empty folders are fine: Snakemake makes an output's folders
    before its job), or be an earlier stand-in folder: never a folder of real data. A new one gets an
    empty manifest at once, so that a concurrent writer (another fetch job) sees a stand-in folder."""
    if (out / MANIFEST).is_file():
        return
    if out.is_dir() and any(p.is_file() for p in out.rglob("*")):
        raise ValueError(f"{out} holds files and is no stand-in folder (no {MANIFEST}): give a new or empty folder, "
                         "so nothing real is overwritten")
    out.mkdir(parents=True, exist_ok=True)
    _replace(out / MANIFEST, json.dumps({"root": str(out), "datasets": {}, "paths": {}}) + "\n")


def _clear(target: Path) -> None:
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()


def generate(datasets: Mapping[str, Mapping[str, Any]], out: Path, scale: Scale, names: Sequence[str] | None = None,
             seed: int = 0, configs: Sequence[str] = ()) -> dict[str, Any]:
    """Write the stand-ins of ``names`` (config entries of ``datasets``) under ``out``; return the manifest.

    Each path's random draws depend only on ``seed`` and the path, so a subset writes the same files.
    Entries an earlier run wrote into ``out`` and this one does not rewrite stay in the manifest and
    the overlay (each path records its own scale).
    """
    out = Path(out).resolve()
    by_path = select(datasets, names)
    with exclusive(out):
        _claim(out)
    began = time.perf_counter()
    records: dict[str, dict[str, Any]] = {}
    for rel, members in by_path.items():
        entries = [datasets[n] for n in members]
        loader = entries[0]["loader"]
        if any(e["loader"] != loader for e in entries):
            raise ValueError(f"datasets {members} read {rel!r} with different loaders")
        _clear(out / rel)
        rng = np.random.default_rng([seed, zlib.crc32(rel.encode())])
        written = FAMILIES[loader](rel, entries, out, scale, rng)
        digest = sha256_file(out / rel) if loader in FILE_LOADERS else None
        records[rel] = {**asdict(written), "scale": scale.name, "seed": seed, "sha256": digest}
    with exclusive(out):   # concurrent writers (parallel fetch jobs) each add their paths to one manifest
        return _record(out, by_path, records, scale, configs, time.perf_counter() - began)


def _record(out: Path, by_path: Mapping[str, list[str]], records: dict[str, dict[str, Any]], scale: Scale,
            configs: Sequence[str], seconds: float) -> dict[str, Any]:
    """Merge this run's paths into the manifest and the overlay beside them; return the manifest."""
    earlier = json.loads((out / MANIFEST).read_text())
    paths = {**{rel: r for rel, r in earlier["paths"].items() if rel not in records}, **records}
    new = {n: rel for rel, members in by_path.items() for n in members}
    manifest = {
        "root": str(out), "configs": list(configs), "max_bytes_per_entry": scale.max_bytes,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "written": list(records), "seconds": round(seconds, 2),
        "bytes": sum(r["bytes"] for r in records.values()),   # of the paths this run wrote
        "datasets": {**{n: rel for n, rel in earlier["datasets"].items() if n not in new and rel in paths}, **new},
        "paths": paths,
    }
    _replace(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    _replace(out / OVERLAY, overlay_text(overlay(manifest), out, configs))
    return manifest


def _replace(path: Path, text: str) -> None:
    """Readers (a make-data job checking a stand-in's digest) never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def overlay(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The config fragment pointing each entry at its stand-in (see the module docstring)."""
    root = Path(manifest["root"])
    entries: dict[str, Any] = {}
    for name, rel in manifest["datasets"].items():
        record = manifest["paths"][rel]
        entry: dict[str, Any] = {"stand_in": record["scale"], "path": str(root / rel)}
        if record["sha256"]:
            entry["source"] = {"sha256": record["sha256"]}
            entry["params"] = {"sha256": record["sha256"]}
        for param, folder in record["extra_paths"].items():
            entry.setdefault("params", {})[param] = str(root / folder)
        entries[name] = entry
    return {"datasets": entries}


def overlay_text(fragment: Mapping[str, Any], out: Path, configs: Sequence[str]) -> str:
    """The overlay file: a header saying what the data is and how to use it, then ``fragment``."""
    made_from = " ".join(configs) or "the config"
    header = (f"# STAND-IN DATA: random values in each dataset's real on-disk format, written by `mmrepro stand-in`\n"
              f"# under {out} from {made_from}. Nothing trained on it is a result. Layer this file last, e.g.\n"
              f"#   snakemake -n --configfile {made_from} {out / OVERLAY}\n"
              f"# What each file holds (scale, counts, shapes, cuts, assumptions): {out / MANIFEST}\n")
    return header + yaml.safe_dump(dict(fragment), sort_keys=False, width=120)
