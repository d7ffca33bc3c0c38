"""Data settings: what the data looks like to a run (complete, modalities missing, a shifted domain).

A setting may rename the split a run reads (``test`` -> ``test@<domain>``), restrict the
modalities the model is built on (unimodal baselines), choose which modalities each sample has
(the ``present`` mask) and transform batches. Settings apply to
every method alike, so any method can be evaluated under any setting.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from mmrepro.data.loader import Batch
from mmrepro.data.missing import PROTOCOLS, present_mask
from mmrepro.methods.registry import SETTINGS


class DataSetting:
    name = "base"

    def split_name(self, split: str) -> str:
        return split

    def target_split(self, split: str) -> str:
        """The split a test-time adapter reads for ``split`` of the target (offline: adapt on train)."""
        return self.split_name(split)

    def modalities(self, available: list[str]) -> list[str]:
        """The modalities the run's model reads, out of the dataset's."""
        return available

    def present(self, split: str, base: np.ndarray) -> np.ndarray:
        """The ``(N, M)`` present mask for ``split`` given the dataset's own (``base``)."""
        return base

    def transform(self, batch: Batch) -> Batch:
        return batch


@SETTINGS.register("complete")
class Complete(DataSetting):
    """Data as stored."""


@SETTINGS.register("zero_fill")
class ZeroFill(DataSetting):
    """Modalities go missing at ``rate`` in train, valid and test alike; missing inputs become zeros."""

    def __init__(self, rate: float, protocol: str = "any", mask_seed: int = 0):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"zero_fill.rate must lie in [0, 1), got {rate}")
        if protocol not in PROTOCOLS:
            raise ValueError(f"zero_fill.protocol must be one of {PROTOCOLS}, got {protocol!r}")
        self.rate, self.protocol, self.mask_seed = rate, protocol, mask_seed

    def present(self, split: str, base: np.ndarray) -> np.ndarray:
        drawn = present_mask(base.shape[0], base.shape[1], self.rate, seed=self.mask_seed, split=split,
                             protocol=self.protocol)
        return base & drawn

    def transform(self, batch: Batch) -> Batch:
        """Zero each absent modality, whatever its shape: sequences (B, T, D) and volumes (B, C, D, H, W)."""
        x = {m: v * batch.present[:, i].view(-1, *[1] * (v.dim() - 1)).to(v.dtype)
             for i, (m, v) in enumerate(batch.x.items())}
        return replace(batch, x=x)


@SETTINGS.register("domain")
class Domain(DataSetting):
    """Train on the source domain, evaluate on ``domain``'s test split (``source`` = no shift);
    test-time adapters read any of the domain's splits (``train@<domain>`` to adapt offline)."""

    def __init__(self, domain: str):
        self.domain = domain

    def split_name(self, split: str) -> str:
        return self.target_split(split) if split == "test" else split

    def target_split(self, split: str) -> str:
        return split if self.domain == "source" else f"{split}@{self.domain}"


@SETTINGS.register("subset")
class Subset(DataSetting):
    """Build and train the model on ``modalities`` only (e.g. the unimodal baselines of a balance study)."""

    def __init__(self, modalities: list[str]):
        if not modalities:
            raise ValueError("subset.modalities must name at least one modality")
        self.keep = list(modalities)

    def modalities(self, available: list[str]) -> list[str]:
        unknown = [m for m in self.keep if m not in available]
        if unknown:
            raise ValueError(f"subset.modalities: {unknown} not in the dataset's modalities {available}")
        return [m for m in available if m in self.keep]
