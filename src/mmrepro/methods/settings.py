"""Data settings: what the data looks like to a run (complete, modalities missing, a shifted domain
or another dataset).

A setting may rename the split a run reads (``test`` -> ``test@<domain>``), restrict the
modalities the model is built on (unimodal baselines), choose which modalities each sample has
(the ``present`` mask, drawn afresh each training epoch when :meth:`DataSetting.redraws`) and
transform batches. It also names the extra test cases a run is scored on (``test_cases``: one
present mask per case, e.g. one per available modality set). Settings apply to every method
alike, so any method can be evaluated under any setting.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from mmrepro.data.loader import Batch
from mmrepro.data.missing import PROTOCOLS, case_masks, case_name, present_mask
from mmrepro.methods.registry import SETTINGS


class DataSetting:
    name = "base"
    #: The split a run validates on (early stopping, a search's score) is the target's: its labels are
    #: target labels (a cross-dataset shift reads every split from the target's store).
    validates_on_target = False

    def split_name(self, split: str) -> str:
        return split

    def target_split(self, split: str) -> str:
        """The split a test-time adapter reads for ``split`` of the target (offline: adapt on train)."""
        return self.split_name(split)

    def modalities(self, available: list[str]) -> list[str]:
        """The modalities the run's model reads, out of the dataset's."""
        return available

    def present(self, split: str, base: np.ndarray, epoch: int | None = None) -> np.ndarray:
        """The ``(N, M)`` present mask for ``split`` given the dataset's own (``base``); ``epoch`` is
        given only where :meth:`redraws` says the mask changes per epoch."""
        return base

    def redraws(self, split: str) -> bool:
        """Whether ``split``'s present mask is drawn afresh every epoch."""
        return False

    def test_cases(self, n: int, names: list[str]) -> dict[str, np.ndarray | None]:
        """Extra test cases: name -> ``(n, M)`` present mask over the dataset's ``names`` (None: as is)."""
        return {}

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

    def present(self, split: str, base: np.ndarray, epoch: int | None = None) -> np.ndarray:
        drawn = present_mask(base.shape[0], base.shape[1], self.rate, seed=self.mask_seed, split=split,
                             protocol=self.protocol)
        return base & drawn

    def transform(self, batch: Batch) -> Batch:
        """Zero each absent modality, whatever its shape: sequences (B, T, D) and volumes (B, C, D, H, W)."""
        x = {m: v * batch.present[:, i].view(-1, *[1] * (v.dim() - 1)).to(v.dtype)
             for i, (m, v) in enumerate(batch.x.items())}
        return replace(batch, x=x)


def _named(setting: str, modalities: list[str], available: list[str] | None = None) -> list[str]:
    """``modalities`` checked: at least one, and (given ``available``) all of the dataset's."""
    if not modalities:
        raise ValueError(f"{setting}.modalities must name at least one modality")
    unknown = [m for m in modalities if available is not None and m not in available]
    if unknown:
        raise ValueError(f"{setting}.modalities: {unknown} not in the dataset's modalities {available}")
    return list(modalities)


class _Withheld(DataSetting):
    """A setting whose missing modalities' features are replaced by ``fill`` (``nan`` or ``zeros``).

    ``nan`` (the default) makes any method that reads a missing modality yield NaN instead of
    silently using data it should not have: a method must honour ``present`` (e.g.
    ``modality_substitution`` zero-fills, MPLMM generates). ``zeros`` is plain zero-filling.
    """

    FILLS = ("nan", "zeros")

    def __init__(self, fill: str):
        if fill not in self.FILLS:
            raise ValueError(f"{self.name}.fill must be one of {self.FILLS}, got {fill!r}")
        self.fill = fill

    def transform(self, batch: Batch) -> Batch:
        value = float("nan") if self.fill == "nan" else 0.0
        x = {m: torch.where(batch.present[:, i].view(-1, *[1] * (v.dim() - 1)), v, torch.full((), value, dtype=v.dtype))
             for i, (m, v) in enumerate(batch.x.items())}
        return replace(batch, x=x)


@SETTINGS.register("missing")
class Missing(_Withheld):
    """MPLMM's missing-modality protocol, for any number of modalities.

    Train, valid and test samples are incomplete with probability ``rate``, an incomplete
    sample's pattern uniform over the non-empty incomplete ones. ``redraw: per_epoch`` draws the
    training patterns afresh each epoch (the released code, which redraws on every load);
    ``fixed`` keeps one seeded pattern per sample. Validation and test patterns are always fixed.
    The run is further scored on one test case per available set (every test sample with that
    set, ``2**M - 2`` cases; their mean is ``test:avg``) and at each of ``test_rates``
    (``test:rate:<r>``, fixed seeded patterns). Missing features become ``fill`` (:class:`_Withheld`).
    """

    REDRAWS = ("per_epoch", "fixed")

    def __init__(self, rate: float = 0.7, redraw: str = "per_epoch", test_rates: list[float] = (),
                 fill: str = "nan", mask_seed: int = 0):
        super().__init__(fill)
        for name, r in [("rate", rate), *[(f"test_rates[{i}]", t) for i, t in enumerate(test_rates)]]:
            if not 0.0 <= r < 1.0:
                raise ValueError(f"missing.{name} must lie in [0, 1), got {r}")
        if redraw not in self.REDRAWS:
            raise ValueError(f"missing.redraw must be one of {self.REDRAWS}, got {redraw!r}")
        self.rate, self.redraw, self.test_rates, self.mask_seed = rate, redraw, list(test_rates), mask_seed

    def redraws(self, split: str) -> bool:
        return split == "train" and self.redraw == "per_epoch"

    def present(self, split: str, base: np.ndarray, epoch: int | None = None) -> np.ndarray:
        drawn = present_mask(base.shape[0], base.shape[1], self.rate, seed=self.mask_seed, split=split,
                             epoch=epoch if self.redraws(split) else None)
        return base & drawn

    def test_cases(self, n: int, names: list[str]) -> dict[str, np.ndarray | None]:
        rates = {f"rate:{r:g}": present_mask(n, len(names), r, seed=self.mask_seed, split=f"test@rate:{r:g}")
                 for r in self.test_rates}
        return {**case_masks(n, names), **rates}


@SETTINGS.register("available")
class Available(_Withheld):
    """Every sample of every split has exactly ``modalities`` (MPLMM's lower bound: one model per
    available set); the model keeps its full input layout, so a backbone trained on all loads."""

    def __init__(self, modalities: list[str], fill: str = "nan"):
        super().__init__(fill)
        self.keep = _named("available", modalities)

    def modalities(self, available: list[str]) -> list[str]:
        _named("available", self.keep, available)
        self._keep_mask = np.isin(available, self.keep)  # the dataset's order; present() needs it
        return available

    def present(self, split: str, base: np.ndarray, epoch: int | None = None) -> np.ndarray:
        if not hasattr(self, "_keep_mask"):
            raise RuntimeError("available.present: call modalities(<dataset modalities>) first")
        return base & self._keep_mask

    def test_cases(self, n: int, names: list[str]) -> dict[str, np.ndarray | None]:
        return {case_name(names, np.isin(names, self.keep)): None}


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


@SETTINGS.register("dataset")
class CrossDataset(DataSetting):
    """Adapt and evaluate on another dataset, ``target`` (CASP's cross-corpus shifts): the run's model
    was trained on the study's dataset, and every split it reads is the target's, under its own name
    (the workflow hands the run the target's store; feature widths must match, checked in the config)."""

    validates_on_target = True

    def __init__(self, target: str):
        self.target = target


@SETTINGS.register("subset")
class Subset(DataSetting):
    """Build and train the model on ``modalities`` only (e.g. the unimodal baselines of a balance study)."""

    def __init__(self, modalities: list[str]):
        self.keep = _named("subset", modalities)

    def modalities(self, available: list[str]) -> list[str]:
        _named("subset", self.keep, available)
        return [m for m in available if m in self.keep]
