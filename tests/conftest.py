"""Shared fixtures: the repository's default config and a small synth store built once per session."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from mmrepro.config import load_schema, run_spec, validate_config
from mmrepro.data import build_store
from mmrepro.spec import RunSpec

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny test models: extra intra-op threads only add spin-wait overhead on a small busy machine.

    Tests that train through ``reproducibility.configure`` set their own thread count.
    """
    torch.set_num_threads(1)


def default_config() -> dict:
    """The repository's config/config.yaml, validated and with defaults filled (a fresh copy)."""
    return validate_config(yaml.safe_load((REPO / "config" / "config.yaml").read_text()), load_schema(SCHEMA))


def balance_spec(**changes) -> RunSpec:
    """The default config's run spec of joint training on synth (seed 0), ``changes`` replacing fields:
    a complete spec where a test only cares about a few of them."""
    return replace(run_spec(default_config(), "balance", "synth", "joint", "complete", 0), **changes)


def small_synth(**n) -> dict:
    """The default synth dataset entry with fewer samples (the same generative model)."""
    ds = copy.deepcopy(default_config()["datasets"]["synth"])
    ds["synth"]["n"] = {"train": 1500, "valid": 300, "test": 600, **n}
    return ds


@pytest.fixture(scope="session")
def synth_store(tmp_path_factory) -> Path:
    """Manifest path of a small synth store shared by the tests that train models."""
    return build_store("synth", small_synth(), tmp_path_factory.mktemp("store") / "synth")
