"""A dataset entry marked ``stand_in`` in the config: its fetch step writes the random files (nothing is
downloaded) and every check holds them to the stand-in's own SHA-256.

A stand-in cannot match the published checksum of the real file (``source.sha256``, MMSA's table),
so for such an entry the digest :func:`~mmrepro.data.standin.generate` recorded in ``stand_in.json``
takes its place, at fetch and at conversion alike, and both say so in their log. The entry's
``stand_in_root`` (set by :func:`mmrepro.config.dataset_spec` when its path is relative to
``data_root``) is where a missing stand-in is written: ``config/rehearsal.yaml`` points ``data_root``
at ``results_rehearsal/standin``, so one ``snakemake`` command writes, converts and trains on them.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmrepro.data.standin import mmin
from mmrepro.data.standin.generate import FILE_LOADERS, MANIFEST, generate
from mmrepro.data.standin.plan import FULL_MAX_BYTES, Scale


#: per loader, converter parameters the real files imply and a stand-in's cannot (the stand-in's
#: generator states them: MMIN's class names, inferred from the real corpus's class totals)
STATED_PARAMS: dict[str, dict[str, Any]] = {"iemocap_h5": mmin.STATED_PARAMS}


def _present(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


def record_of(name: str, path: Path) -> tuple[Path, dict[str, Any]]:
    """The manifest above ``path`` that wrote it and its record of ``path`` (scale, digest, counts)."""
    path = Path(path).resolve()
    for folder in path.parents:
        manifest = folder / MANIFEST
        if manifest.is_file():
            record = json.loads(manifest.read_text())["paths"].get(path.relative_to(folder).as_posix())
            if record is not None:
                return manifest, record
    raise FileNotFoundError(f"dataset {name!r} is marked stand_in, but no {MANIFEST} in a folder above {path} "
                            f"records it: write it with `mmrepro stand-in` (or let the fetch step write it: a path "
                            f"relative to data_root)")


def with_own_checksum(name: str, entry: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """``entry`` with the stand-in's own digest in place of the published one (and the converter
    parameters the real files would imply: :data:`STATED_PARAMS`), and a line saying so.

    Raises when no manifest records the files or they were written at another scale than the
    entry's ``stand_in`` (a cost measurement on tiny files would be wrong by orders of magnitude).
    """
    path = Path(entry["path"])
    manifest, record = record_of(name, path)
    if record["scale"] != entry["stand_in"]:
        raise ValueError(f"dataset {name!r}: the stand-in at {path} was written at scale {record['scale']!r} "
                         f"({manifest}), the config says stand_in: {entry['stand_in']!r}; write it again or "
                         "change the config")
    out = copy.deepcopy(dict(entry))
    out["params"] = {**STATED_PARAMS.get(entry["loader"], {}), **out.get("params", {})}   # the entry's own win
    if entry["loader"] not in FILE_LOADERS:
        return out, (f"dataset {name!r} is a random stand-in ({record['scale']}) written by mmrepro stand-in "
                     f"({manifest}): nothing trained on it is a result; its files are checked against the "
                     "expected layout (no published checksum exists for a folder)")
    digest = record["sha256"]
    out["source"] = {**out.get("source", {}), "sha256": digest}
    out["params"] = {**out.get("params", {}), "sha256": digest}
    return out, (f"dataset {name!r} is a random stand-in ({record['scale']}) written by mmrepro stand-in: nothing "
                 f"trained on it is a result; checksum enforcement uses the stand-in's own SHA-256 {digest} "
                 f"recorded in {manifest}, not the published one of the real file (which it cannot match)")


def fetch(name: str, entry: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The fetch step of a stand-in entry: write its files when absent (under ``stand_in_root``), then
    return the entry to verify (its own checksum in place) and what was done, in words."""
    path = Path(entry["path"])
    done = []
    if not _present(path):
        root = entry.get("stand_in_root")
        if root is None:
            raise FileNotFoundError(f"dataset {name!r}: the stand-in at {path} is missing and its path is not "
                                    "relative to data_root, so the fetch step cannot write it; run `mmrepro stand-in`")
        rel = Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
        scale = Scale(entry["stand_in"], FULL_MAX_BYTES if entry["stand_in"] == "full" else None, progress=False)
        generate({name: {**entry, "path": rel}}, Path(root), scale, [name])
        done.append(f"wrote a random {entry['stand_in']} stand-in at {path} (mmrepro stand-in; nothing downloaded)")
    checked, note = with_own_checksum(name, entry)
    return checked, [*done, note]
