"""The feature store: one checked directory of ``.npy`` arrays plus a JSON manifest per dataset.

Training reads only stores. Arrays are opened memory-mapped, so a split is never loaded whole;
the manifest records each array's shape, dtype, byte size and SHA-256, the dataset schema, the
provenance of the data and, for synthetic data, the oracle scores and the reachable ceiling of every
subset of the modalities. A store is written into a
temporary sibling directory and renamed into place only when complete, so an interrupted
conversion leaves nothing that looks valid; the next conversion removes what a killed one left
(:func:`work_folder`, :func:`remove_stale`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from mmrepro.data.schema import DataValidationError, DatasetSchema, validate_split

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
#: What names a conversion's work folder: ``.<stem>.partial-<host>-<pid>-<random>``.
PARTIAL = ".partial-"

log = logging.getLogger(__name__)


def work_folder(parent: Path, stem: str) -> Path:
    """A new hidden folder under ``parent`` for a conversion's work in progress, named after ``stem``,
    this host and this process, so that a later conversion can tell it is left over from a killed one
    (:func:`remove_stale`)."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{stem}{PARTIAL}{socket.gethostname()}-{os.getpid()}-", dir=parent))


def leftovers(parent: Path, stem: str = "*") -> list[Path]:
    """The conversion work folders under ``parent`` (of ``stem``, or of any)."""
    return sorted(p for p in Path(parent).glob(f".{stem}{PARTIAL}*") if p.is_dir())


def _owner(folder: Path) -> tuple[str, int] | None:
    """The host and process id a work folder's name records (None: not one of ours)."""
    host, sep, rest = folder.name.partition(PARTIAL)[2].rpartition("-")[0].rpartition("-")
    return (host, int(rest)) if sep and rest.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(parent: Path, stem: str) -> list[Path]:
    """Remove the work folders a killed conversion of ``stem`` left under ``parent`` (its process on
    this host is gone); return them. One of another host is left, with a warning naming it: only
    that host knows whether its conversion still runs."""
    removed = []
    for folder in leftovers(parent, stem):
        owner = _owner(folder)
        if owner is None or owner == (socket.gethostname(), os.getpid()):
            continue
        if owner[0] != socket.gethostname():
            log.warning("%s: left by a conversion on host %s; remove it if that conversion no longer runs",
                        folder, owner[0])
        elif not _alive(owner[1]):
            shutil.rmtree(folder, ignore_errors=True)
            log.info("removed %s, left by a killed conversion (process %d)", folder, owner[1])
            removed.append(folder)
    return removed


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_store(root: Path, schema: DatasetSchema,
                splits: Iterable[tuple[str, dict[str, np.ndarray], dict[str, Any]]],
                provenance: dict[str, Any]) -> Path:
    """Validate and write every ``(split, arrays, oracle)`` and a manifest; return the manifest path.

    Each split is validated against ``schema`` before its arrays are written; any failure
    removes the partial store and re-raises.
    """
    root = Path(root)
    remove_stale(root.parent, root.name)
    tmp = work_folder(root.parent, root.name)
    try:
        manifest: dict[str, Any] = {
            "format_version": FORMAT_VERSION, "schema": schema.to_dict(), "splits": {}, "oracle": {},
            "provenance": {**provenance, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")},
        }
        for split, arrays, oracle in splits:
            n = validate_split(schema, split, arrays, file=str(provenance.get("source", root)))
            entries = {}
            for key, array in arrays.items():
                rel = Path(split) / f"{key}.npy"
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                np.save(tmp / rel, np.ascontiguousarray(array), allow_pickle=False)
                entries[key] = {"file": rel.as_posix(), "shape": list(array.shape), "dtype": array.dtype.str,
                                "bytes": (tmp / rel).stat().st_size, "sha256": sha256_file(tmp / rel)}
            manifest["splits"][split] = {"n": n, "arrays": entries}
            if oracle:
                manifest["oracle"][split] = oracle
        missing = set(schema.splits) - set(manifest["splits"])
        if missing:
            raise DataValidationError(f"splits {sorted(missing)} declared by the schema were not written",
                                      file=str(root))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root / MANIFEST


class FeatureStore:
    """Read side of a store: manifest, schema, oracle scores and memory-mapped split arrays."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        if self.root.name == MANIFEST:
            self.root = self.root.parent
        path = self.root / MANIFEST
        if not path.is_file():
            raise DataValidationError("no feature store here (manifest.json is missing); run the data rule first",
                                      file=str(path))
        try:
            self.manifest = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DataValidationError(f"manifest is not valid JSON ({e})", file=str(path)) from e
        self.schema = DatasetSchema.from_dict(self.manifest["schema"])

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    def oracle(self, split: str, task: str) -> dict[str, float]:
        """Ceiling scores of ``task`` on ``split``, or ``{}`` when the dataset has no known oracle."""
        return self.manifest.get("oracle", {}).get(split, {}).get(task, {})

    def ceiling(self, split: str, task: str, modalities: list[str] | None = None) -> dict[str, float]:
        """Reachable ceiling of a model that reads ``modalities`` (default: all), or ``{}`` when unknown.

        Recorded under ``oracle.<split>.ceilings.<a+b>.<task>``, modalities in schema order.
        """
        names = self.schema.modality_names
        key = "+".join(m for m in names if modalities is None or m in modalities)
        return self.manifest.get("oracle", {}).get(split, {}).get("ceilings", {}).get(key, {}).get(task, {})

    def open_split(self, split: str, *, validate: bool = False) -> dict[str, np.ndarray]:
        """Memory-map one split, checking each file's size, shape and dtype against the manifest.

        ``validate`` also checks the values against the schema (NaN/inf, label ranges, lengths,
        unique ids): a store edited after conversion keeps its sizes, so only this (or
        :meth:`verify`) sees it. One pass over the split, far cheaper than an epoch.
        """
        if split not in self.manifest["splits"]:
            raise DataValidationError(f"unknown split; the store has {self.splits}", file=str(self.root), split=split)
        out = {}
        for key, entry in self.manifest["splits"][split]["arrays"].items():
            path = self.root / entry["file"]
            if not path.is_file():
                raise DataValidationError("array file is missing", file=str(path), split=split, key=key)
            if path.stat().st_size != entry["bytes"]:
                raise DataValidationError(f"file has {path.stat().st_size} bytes, manifest says {entry['bytes']} "
                                          "(truncated or replaced)", file=str(path), split=split, key=key)
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except ValueError as e:
                raise DataValidationError(f"unreadable array ({e})", file=str(path), split=split, key=key) from e
            if list(array.shape) != entry["shape"] or array.dtype.str != entry["dtype"]:
                raise DataValidationError(f"expected {entry['shape']} {entry['dtype']}, found "
                                          f"{list(array.shape)} {array.dtype.str}", file=str(path), split=split, key=key)
            out[key] = array
        if validate:
            validate_split(self.schema, split, out, file=str(self.root / split))
        return out

    def verify(self) -> None:
        """Recompute every array's SHA-256 and compare with the manifest (slow on big stores)."""
        for split, info in self.manifest["splits"].items():
            self.open_split(split)
            for key, entry in info["arrays"].items():
                path = self.root / entry["file"]
                if sha256_file(path) != entry["sha256"]:
                    raise DataValidationError("checksum mismatch (file changed since conversion)",
                                              file=str(path), split=split, key=key)
