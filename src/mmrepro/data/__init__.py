"""Data: dataset schemas, the feature store, loaders in the batch contract, and dataset builders."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

from mmrepro.data import synth
from mmrepro.data.store import write_store

log = logging.getLogger(__name__)

#: loader name -> "module:function" of its converter, imported only when that loader runs (the
#: converters pull in nibabel, h5py, PIL and transformers, which a training job never needs)
CONVERTERS = {"mmsa": "mmsa:convert_mmsa", "mult": "mmsa:convert_mult", "brats": "brats:convert_brats",
              "food101": "food101:convert_food101", "iemocap_h5": "iemocap_h5:convert_iemocap_h5"}


#: loader -> the modalities its store holds, in order (known before any file is read, so a setting that
#: names a modality the dataset lacks fails at config time; brats: its ``modalities`` parameter, if set)
LOADER_MODALITIES = {"mmsa": ("text", "audio", "vision"), "mult": ("text", "audio", "vision"),
                     "iemocap_h5": ("text", "audio", "vision"), "food101": ("image", "text"),
                     "brats": ("flair", "t1ce", "t1", "t2")}


def dataset_modalities(entry: dict[str, Any]) -> list[str]:
    """The modalities of a dataset config entry's store."""
    if entry["loader"] == "synth":
        return [m["name"] for m in entry["synth"]["modalities"]]
    return list(entry.get("params", {}).get("modalities") or LOADER_MODALITIES[entry["loader"]])


def converter(loader: str):
    module, function = CONVERTERS[loader].split(":")
    return getattr(importlib.import_module(f"mmrepro.data.{module}"), function)


def build_store(name: str, cfg: dict[str, Any], out: Path) -> Path:
    """Produce the feature store of dataset ``name`` from its config entry; return the manifest path.

    Raw data is verified first (published or recorded checksum, expected files), since a file
    placed by hand never went through the fetch rule.
    """
    if cfg["loader"] == "synth":
        params = cfg["synth"]
        return write_store(Path(out), synth.schema_of(params), synth.generate(params),
                           provenance={"dataset": name, "generator": "mmrepro.data.synth", "params": params,
                                       "source": f"synth:{name}"})
    if cfg["loader"] in CONVERTERS:
        from mmrepro.data.download import verify

        checksums = cfg.get("checksums")
        if cfg.get("stand_in"):   # random files: held to their own digest, not the real file's (said in the log)
            from mmrepro.data.standin.entry import with_own_checksum

            cfg, note = with_own_checksum(name, cfg)
            log.warning(note)
            checksums = None
        checked = verify(name, cfg.get("source"), cfg["path"], checksums=checksums)
        schema, splits, provenance = converter(cfg["loader"])(Path(cfg["path"]), name=name, **cfg.get("params", {}))
        return write_store(Path(out), schema, splits, {**provenance, "raw_check": checked})
    raise ValueError(f"dataset {name!r}: unknown loader {cfg['loader']!r}")
