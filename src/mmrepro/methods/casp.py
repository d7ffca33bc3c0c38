"""CASP (Guo et al., AAAI 2025): test-time adaptation in two stages, updating only the LayerNorm
affine parameters inside the transformer layers (everything else frozen).

Stage 1 (contrastive): each batch is seen twice, as is and with one randomly chosen modality
zeroed for the whole batch (drawn uniformly from the run's torch generator; the released code draws
text, audio, vision with probabilities 0.33, 0.33, 0.34 from Python's ``random``, a negligible
difference that keeps every draw under the run's one seed); the two views' L2-normalised representations
(``ModelOutput.representation``) are pulled together by NT-Xent, every other sample of either
view a negative. Dropout stays on while adapting. Eval-mode predictions of the whole pool are
kept before stage 1 and every ``snapshot_every`` epochs.

Stage 2 (stable pseudo-labels): a sample's instability is the mean absolute change of its
prediction between consecutive snapshots, its pseudo-label the snapshots' mean. The stable ones
(instability at most the ``keep_quantile`` quantile) are regressed on with L1. The released code
keeps the *least* stable 5% instead (``selection: official_code``), and picks checkpoints and
steps a plateau scheduler on target *validation labels* (``label_use: official_code``, marked in
the table): after every epoch of either stage, the state with the best Acc-2 as the code counts it
(``> 0`` on predictions and labels, a zero label negative: :func:`official_acc2`, not the table's
``acc2_has0``) is kept, and the scheduler steps on the code's validation loss (the mean of the
batch-mean L1 losses over batches of ``batch_size``: :func:`mean_batch_l1`); by default neither.
Without stage 1 the snapshots come from MC dropout.

Backbones (``casp_late``, ``casp_early``): the released code attends to every time step, padding
included; ours masks padded steps out of attention, which changes predictions on zero-padded
inputs (by 0.03-0.05 on CASP's MMSA features; see :mod:`mmrepro.models.transformer`). Inputs stored
at full length (no ``*_lengths``) are attended to as in the code.

Offline, the pool is the target's train split (``epochs`` passes, batches of ``batch_size``);
online, each test batch is its own pool (``online_steps`` contrastive steps, one snapshot after
each), adapted on and then predicted; the adapted state carries over to the next batch.
"""

from __future__ import annotations

import copy
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmrepro.data.loader import Batch
from mmrepro.methods.adapters import (AdaptProtocol, BatchPool, EpochCallback, Pool, TestTimeAdapter, Validate, batches,
                                      clipped_step, layer_norm_parameters, only_trainable, random_drop_view)
from mmrepro.methods.params import Count, OneOf, Positive, PositiveInt, Range
from mmrepro.methods.registry import ADAPTERS
from mmrepro.metrics import official_acc2

STAGES = ("contrastive", "pseudo_label")
SELECTIONS = ("stable", "official_code")
LABEL_USES = ("none", "official_code")
#: The released code keeps the samples above this instability quantile (``selection: official_code``).
OFFICIAL_QUANTILE = 0.95


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss over ``2N`` L2-normalised vectors: each one's positive is its other view, the
    other ``2N - 2`` are negatives; mean over all ``2N`` anchors."""
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    n = z1.shape[0]
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    positive = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, positive)


def instability(snapshots: np.ndarray) -> np.ndarray:
    """``(K, N)`` predictions -> ``(N,)`` mean absolute change between consecutive snapshots."""
    return np.abs(np.diff(snapshots, axis=0)).mean(axis=0)


def select_stable(snapshots: np.ndarray, selection: str, keep_quantile: float) -> tuple[np.ndarray, np.ndarray]:
    """Pseudo-labels (snapshot mean) and the boolean mask of the samples stage 2 trains on."""
    s = instability(snapshots)
    if selection == "stable":
        keep = s <= np.quantile(s, keep_quantile)
    else:  # the released code: strictly above the 0.95 quantile, i.e. the least stable
        keep = s > np.quantile(s, OFFICIAL_QUANTILE)
    return snapshots.mean(axis=0), keep


def mean_batch_l1(pred: np.ndarray, y: np.ndarray, batch_size: int) -> float:
    """The released code's validation loss: the mean over batches of ``batch_size`` (the last one may be
    partial) of each batch's mean L1; equal to the per-sample MAE only when every batch is full."""
    pred, y = np.asarray(pred, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return float(np.mean([np.abs(pred[s:s + batch_size] - y[s:s + batch_size]).mean()
                          for s in range(0, len(y), batch_size)]))


class _BestByTargetLabels:
    """The released code's use of target validation labels after every epoch: step a plateau scheduler
    (patience 10, factor 0.1) on :func:`mean_batch_l1` over batches of ``batch_size`` (the code reads
    every split with the one batch size), and keep the state of the first epoch whose
    :func:`official_acc2` beats the best so far, which starts at 0 as in the code (if none does, the
    code saves no checkpoint; here the state before the stage stays)."""

    def __init__(self, model: nn.Module, optimiser: torch.optim.Optimizer, validate: Validate, batch_size: int):
        self.model, self.validate, self.batch_size = model, validate, batch_size
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimiser, patience=10, factor=0.1)
        self.best, self.state = 0.0, copy.deepcopy(model.state_dict())

    def update(self) -> None:
        pred, y = self.validate()
        self.scheduler.step(mean_batch_l1(pred, y, self.batch_size))
        acc2 = official_acc2(pred, y)
        if acc2 > self.best:
            self.best, self.state = acc2, copy.deepcopy(self.model.state_dict())

    def restore(self) -> None:
        self.model.load_state_dict(self.state)


@ADAPTERS.register("casp")
class CASP(TestTimeAdapter):
    default_stages: tuple[str, ...] = STAGES

    def __init__(self, model: nn.Module, protocol: AdaptProtocol = "offline",
                 stages: list[Annotated[str, OneOf(STAGES)]] | None = None, epochs: PositiveInt = 15,
                 snapshot_every: PositiveInt = 3, pl_epochs: Count = 5, batch_size: PositiveInt = 24,
                 online_steps: PositiveInt = 1, temperature: Positive = 0.5, lr: Positive = 1e-3, clip: Positive = 0.8,
                 selection: Annotated[str, OneOf(SELECTIONS)] = "stable",
                 keep_quantile: Annotated[float, Range(0, 1, low_open=True)] = 0.5,
                 mc_snapshots: Annotated[int, Range(2)] = 6, stage2_params: Annotated[str, OneOf(("norms", "all"))] = "norms",
                 label_use: Annotated[str, OneOf(LABEL_USES)] = "none"):
        super().__init__(model)
        self.protocol = protocol
        self.stages = tuple(self.default_stages if stages is None else stages)
        if not self.stages:
            raise ValueError(f"{self.name}.stages: must be a non-empty subset of {STAGES}, got {stages}")
        if label_use != "none" and protocol == "online":
            raise ValueError("label_use: official_code picks checkpoints per epoch: offline protocol only")
        self.offline = protocol == "offline"
        self.uses_target_labels = label_use == "official_code"
        self.epochs, self.snapshot_every, self.pl_epochs = epochs, snapshot_every, pl_epochs
        self.batch_size, self.online_steps = batch_size, online_steps
        self.temperature, self.lr, self.clip = temperature, lr, clip
        self.selection, self.keep_quantile, self.mc_snapshots = selection, keep_quantile, mc_snapshots
        self.norms = layer_norm_parameters(model)
        self.stage2 = self.norms if stage2_params == "norms" else list(model.parameters())
        self._optimisers: dict[str, torch.optim.Optimizer] = {}

    # -- the two stages over one pool ------------------------------------------------------------
    def _optimiser(self, stage: str, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """One Adam per stage; online it persists across batches (the stream is never reset)."""
        if self.offline or stage not in self._optimisers:
            self._optimisers[stage] = torch.optim.Adam(only_trainable(self.model, params), lr=self.lr)
        only_trainable(self.model, params)
        return self._optimisers[stage]

    @torch.no_grad()
    def _snapshot(self, pool: Pool, size: int, train_mode: bool = False) -> np.ndarray:
        self.model.train(train_mode)
        return torch.cat([self.model(b).pred for b in batches(pool, size)]).cpu().numpy()

    def _episode(self, pool: Pool, size: int, epochs: int, every: int, on_epoch: EpochCallback,
                 validate: Validate | None) -> None:
        if "contrastive" in self.stages:
            snapshots = [self._snapshot(pool, size)]
            optimiser = self._optimiser("contrastive", self.norms)
            best = _BestByTargetLabels(self.model, optimiser, validate, size) if self.uses_target_labels else None
            for epoch in range(1, epochs + 1):
                self.model.train()
                for batch in batches(pool, size):
                    z1 = self.model(batch).representation
                    z2 = self.model(random_drop_view(batch)).representation
                    clipped_step(optimiser, nt_xent(z1, z2, self.temperature), self.clip)
                if epoch % every == 0:
                    snapshots.append(self._snapshot(pool, size))
                if best is not None:
                    best.update()
                on_epoch(epoch)
            if best is not None:
                best.restore()
        else:  # nothing moves the predictions: draw the snapshots with dropout on
            snapshots = [self._snapshot(pool, size, train_mode=True) for _ in range(self.mc_snapshots)]
        if "pseudo_label" in self.stages and self.pl_epochs:
            self._pseudo_label(pool, size, np.stack(snapshots), epochs, on_epoch, validate)
        self.model.eval()

    def _pseudo_label(self, pool: Pool, size: int, snapshots: np.ndarray, done: int, on_epoch: EpochCallback,
                      validate: Validate | None) -> None:
        target, keep = select_stable(snapshots, self.selection, self.keep_quantile)
        rows = np.flatnonzero(keep)
        target = torch.as_tensor(target, dtype=torch.float32)
        optimiser = self._optimiser("pseudo_label", self.stage2)
        best = _BestByTargetLabels(self.model, optimiser, validate, size) if self.uses_target_labels else None
        for epoch in range(1, self.pl_epochs + 1):
            self.model.train()
            for start in range(0, len(rows), size):
                chunk = rows[start:start + size]
                pred = self.model(pool.batch(chunk)).pred
                clipped_step(optimiser, F.l1_loss(pred, target[chunk].to(pred.device)), self.clip)
            if best is not None:
                best.update()
            on_epoch(done + epoch)
        if best is not None:
            best.restore()

    # -- the adapter interface -------------------------------------------------------------------
    def adapt(self, pool: Pool, on_epoch: EpochCallback | None = None, validate: Validate | None = None) -> None:
        if self.uses_target_labels and validate is None:
            raise ValueError("label_use: official_code needs the target validation split")
        self._episode(pool, self.batch_size, self.epochs, self.snapshot_every, on_epoch or (lambda epoch: None),
                      validate)

    def predict(self, batch: Batch) -> torch.Tensor:
        if not self.offline:
            self._episode(BatchPool(batch), len(batch), self.online_steps, 1, lambda step: None, None)
        self.model.eval()
        with torch.no_grad():
            return self.model(batch).pred


@ADAPTERS.register("casp_contrastive")
class CASPContrastive(CASP):
    """CASP's ablation: stage 1 only."""

    default_stages = ("contrastive",)


@ADAPTERS.register("casp_pseudo_label")
class CASPPseudoLabel(CASP):
    """CASP's ablation: stage 2 only, on MC-dropout snapshots of the source model."""

    default_stages = ("pseudo_label",)
