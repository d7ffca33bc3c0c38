"""Data: dataset schemas, the feature store, loaders in the batch contract, and dataset builders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmrepro.data import synth
from mmrepro.data.store import write_store


def build_store(name: str, cfg: dict[str, Any], out: Path) -> Path:
    """Produce the feature store of dataset ``name`` from its config entry; return the manifest path."""
    if cfg["loader"] == "synth":
        params = cfg["synth"]
        return write_store(Path(out), synth.schema_of(params), synth.generate(params),
                           provenance={"dataset": name, "generator": "mmrepro.data.synth", "params": params,
                                       "source": f"synth:{name}"})
    raise ValueError(f"dataset {name!r}: unknown loader {cfg['loader']!r}")
