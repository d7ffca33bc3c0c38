"""The shift study's test-time baselines, each a plug-in of the adapter family; none reads labels.

- ``tta_average``: the source model's predictions averaged over the input and its modality-drop
  views (each modality zeroed in turn); nothing is updated.
- ``norm_view_consistency``: LayerNorm affine parameters updated to minimise the variance of the
  predictions across those views (a Tent-like norm-only objective for regression; not Tent, which
  minimises class entropy).
- ``mean_teacher``: CoTTA-style (Wang et al., 2022): the student regresses onto an EMA teacher's
  view-averaged predictions, a random fraction of its weights is restored to the source weights
  each step, and the teacher answers. Regression needs no change to the scheme.
- ``ssa``: significant-subspace alignment for regression (Adachi et al., ICLR 2025): target
  features, projected on the principal directions of the *source* features (statistics saved at
  source training, no source data), are pulled to the source mean and variances by a symmetric
  Gaussian KL per direction. Directions are weighted equally (the paper weights them by their
  alignment with a linear regressor; the heads here are MLPs).

Updating baselines share one loop: online, ``steps`` updates on each test batch before answering;
offline, ``epochs`` passes over the target's train pool, then answers without updating.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated

import torch
from torch import nn

from mmrepro.data.loader import Batch
from mmrepro.methods.adapters import (AdaptProtocol, EpochCallback, Pool, TestTimeAdapter, Validate, batches,
                                      clipped_step, drop_modality, layer_norm_parameters, only_trainable)
from mmrepro.methods.params import Fraction, OneOf, Positive, PositiveInt, Rate
from mmrepro.methods.registry import ADAPTERS

PARAM_SETS = ("norms", "all")
ParamSet = Annotated[str, OneOf(PARAM_SETS)]


def views(batch: Batch) -> list[Batch]:
    """The input and, for each modality, the input with that modality zeroed."""
    return [batch, *(drop_modality(batch, m) for m in batch.x)]


@ADAPTERS.register("tta_average")
class TTAAverage(TestTimeAdapter):
    """Mean prediction over the modality-drop views; eval mode, no update."""

    @torch.no_grad()
    def predict(self, batch: Batch) -> torch.Tensor:
        self.model.eval()
        return torch.stack([self.model(v).pred for v in views(batch)]).mean(0)


class UpdatingAdapter(TestTimeAdapter):
    """One loss per batch, minimised over ``params`` (``norms``: in-layer LayerNorm affine; ``all``)."""

    train_mode = True  # dropout on while updating

    def __init__(self, model: nn.Module, protocol: AdaptProtocol = "online", epochs: PositiveInt = 1,
                 steps: PositiveInt = 1, batch_size: PositiveInt = 64, lr: Positive = 1e-3, clip: Positive = 0.8,
                 params: ParamSet = "norms"):
        super().__init__(model)
        self.offline = protocol == "offline"
        self.epochs, self.steps, self.batch_size, self.clip = epochs, steps, batch_size, clip
        trainable = layer_norm_parameters(model) if params == "norms" else list(model.parameters())
        self.optimiser = torch.optim.Adam(only_trainable(model, trainable), lr=lr)

    def loss(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def update(self, batch: Batch) -> None:
        self.model.train(self.train_mode)
        clipped_step(self.optimiser, self.loss(batch), self.clip)

    @torch.no_grad()
    def answer(self, batch: Batch) -> torch.Tensor:
        self.model.eval()
        return self.model(batch).pred

    def adapt(self, pool: Pool, on_epoch: EpochCallback | None = None, validate: Validate | None = None) -> None:
        for epoch in range(1, self.epochs + 1):
            for batch in batches(pool, self.batch_size):
                self.update(batch)
            if on_epoch is not None:
                on_epoch(epoch)

    def predict(self, batch: Batch) -> torch.Tensor:
        if not self.offline:
            for _ in range(self.steps):
                self.update(batch)
        return self.answer(batch)


@ADAPTERS.register("norm_view_consistency")
class NormViewConsistency(UpdatingAdapter):
    """Variance of the predictions across the modality-drop views, mean over the batch."""

    def loss(self, batch: Batch) -> torch.Tensor:
        return torch.stack([self.model(v).pred for v in views(batch)]).var(0, unbiased=False).mean()


@ADAPTERS.register("mean_teacher")
class MeanTeacher(UpdatingAdapter):
    """CoTTA-style: EMA teacher (``ema``), view-averaged teacher targets, stochastic restore (``restore``)."""

    def __init__(self, model: nn.Module, ema: Rate = 0.999, restore: Fraction = 0.01, params: ParamSet = "all", **kw):
        super().__init__(model, params=params, **kw)
        self.ema, self.restore = ema, restore
        self.teacher = copy.deepcopy(model).eval().requires_grad_(False)
        self.source = {n: p.detach().clone() for n, p in model.named_parameters()}

    def loss(self, batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            target = torch.stack([self.teacher(v).pred for v in views(batch)]).mean(0)
        return (self.model(batch).pred - target).pow(2).mean()

    @torch.no_grad()
    def update(self, batch: Batch) -> None:
        with torch.enable_grad():
            super().update(batch)
        for (name, p), t in zip(self.model.named_parameters(), self.teacher.parameters()):
            t.mul_(self.ema).add_(p, alpha=1.0 - self.ema)
            if p.requires_grad and self.restore:
                back = torch.rand_like(p) < self.restore
                p.copy_(torch.where(back, self.source[name], p))

    @torch.no_grad()
    def answer(self, batch: Batch) -> torch.Tensor:
        return self.teacher(batch).pred


def feature_statistics(features: torch.Tensor, dims: int | None = None) -> dict[str, torch.Tensor]:
    """Mean, principal directions (columns, largest variance first) and their variances of ``(N, F)``."""
    mean = features.mean(0)
    variances, directions = torch.linalg.eigh(torch.cov((features - mean).T))
    order = variances.argsort(descending=True)[:dims]
    return {"mean": mean, "directions": directions[:, order], "variances": variances[order].clamp_min(1e-6)}


@ADAPTERS.register("ssa")
class SSA(UpdatingAdapter):
    """Symmetric KL between the target batch's and the source's Gaussians on the top ``dims`` directions."""

    train_mode = False  # feature statistics are compared without dropout noise
    needs_source_stats = True

    def __init__(self, model: nn.Module, source_stats: Path | str | dict[str, torch.Tensor], dims: PositiveInt = 8,
                 **kw):
        super().__init__(model, **kw)
        stats = source_stats if isinstance(source_stats, dict) else torch.load(source_stats, map_location="cpu")
        self.mean, self.directions = stats["mean"], stats["directions"][:, :dims]
        self.variances = stats["variances"][:dims]

    def loss(self, batch: Batch) -> torch.Tensor:
        z = (self.model(batch).fused - self.mean) @ self.directions
        mu, var = z.mean(0), z.var(0, unbiased=False).clamp_min(1e-6)
        s = self.variances
        # KL(t||s) + KL(s||t) for 1-D Gaussians with source mean 0 (the projection is centred on it)
        kl = 0.5 * ((var + mu**2) / s + (s + mu**2) / var) - 1.0
        return kl.sum()
