"""Data: dataset schemas, the feature store, loaders in the batch contract, and dataset builders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmrepro.data import mmsa, synth
from mmrepro.data.store import write_store

CONVERTERS = {"mmsa": mmsa.convert_mmsa, "mult": mmsa.convert_mult}


def build_store(name: str, cfg: dict[str, Any], out: Path) -> Path:
    """Produce the feature store of dataset ``name`` from its config entry; return the manifest path."""
    if cfg["loader"] == "synth":
        params = cfg["synth"]
        return write_store(Path(out), synth.schema_of(params), synth.generate(params),
                           provenance={"dataset": name, "generator": "mmrepro.data.synth", "params": params,
                                       "source": f"synth:{name}"})
    if cfg["loader"] in CONVERTERS:
        schema, splits, provenance = CONVERTERS[cfg["loader"]](Path(cfg["path"]), name=name, **cfg.get("params", {}))
        return write_store(Path(out), schema, splits, provenance)
    raise ValueError(f"dataset {name!r}: unknown loader {cfg['loader']!r}")
