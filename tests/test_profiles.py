"""The workflow's profiles. Snakemake loads ``workflow/profiles/default`` beside any ``--profile`` and
lets its keys win whole (a ``default-resources`` there replaces the other profile's block, account
and partition included), so it must set no key that the SLURM profile sets otherwise. The SLURM
profile itself runs for real in tests/test_slurm.py."""

from __future__ import annotations

import yaml

from conftest import REPO

PROFILES = REPO / "workflow" / "profiles"


def test_the_default_profile_overrides_nothing_the_slurm_profile_sets():
    default = yaml.safe_load((PROFILES / "default" / "config.yaml").read_text())
    slurm = yaml.safe_load((PROFILES / "slurm" / "config.yaml").read_text())
    assert {k: (v, slurm[k]) for k, v in default.items() if k in slurm and v != slurm[k]} == {}
    assert {"slurm_account", "slurm_partition", "mem_mb", "runtime"} <= set(slurm["default-resources"])
    # a refusal fails once: Snakemake's retries cannot tell it from a crash; SLURM requeues node failures
    assert (slurm["retries"], slurm["slurm-requeue"], slurm["show-failed-logs"]) == (0, True, True)
