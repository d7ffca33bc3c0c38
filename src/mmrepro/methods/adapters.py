"""Test-time adapters: a trained model meets unlabelled target data.

Two protocols. *Online*: ``predict(batch)`` is called on each test batch in turn and may update
the model before answering. *Offline*: ``adapt(pool)`` first gets the target's unlabelled train
split (several epochs allowed), then ``predict`` answers the test split without updating.
Batches reach adapters with their labels removed (``batch.y is None``), so no adapter can peek
at target labels; the one exception, CASP's ``label_use: official_code``, is handed a target
validation callback explicitly and is marked in the results. The trivial member, ``source_only``,
never adapts.

Also here, what several adapters share: the LayerNorm affine parameters of transformer layers
(what norm-only adaptation updates), the modality-drop view, and pools of unlabelled samples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Annotated, Protocol

import numpy as np
import torch
from torch import nn

from mmrepro.data.loader import Batch, SplitLoader
from mmrepro.methods.params import OneOf
from mmrepro.methods.registry import ADAPTERS

PROTOCOLS = ("offline", "online")
#: an adapter's ``protocol`` parameter: adapt on the target's train split first, or as the test stream passes
AdaptProtocol = Annotated[str, OneOf(PROTOCOLS)]

#: ``on_epoch(epoch)`` after each adaptation epoch (0: before any), so the job can record target error.
EpochCallback = Callable[[int], None]
#: The current model's predictions on the target validation split (eval mode, in the split's order) and
#: the split's labels; only adapters that declare label use get one.
Validate = Callable[[], tuple[np.ndarray, np.ndarray]]


class Pool(Protocol):
    """Unlabelled samples addressable by position ``0..n-1``."""

    n: int

    def batch(self, rows: np.ndarray) -> Batch: ...


def batches(pool: Pool, size: int) -> Iterator[Batch]:
    """The pool in its fixed order, ``size`` samples at a time."""
    for start in range(0, pool.n, size):
        yield pool.batch(np.arange(start, min(start + size, pool.n)))


@dataclass(frozen=True)
class SplitPool:
    """A target split as an adaptation pool (offline protocol), labels removed."""

    loader: SplitLoader
    device: str = "cpu"

    @property
    def n(self) -> int:
        return self.loader.n

    def batch(self, rows: np.ndarray) -> Batch:
        return replace(self.loader.batch(rows).to(self.device), y=None)


@dataclass(frozen=True)
class BatchPool:
    """One stream batch as a pool (online protocol)."""

    whole: Batch

    @property
    def n(self) -> int:
        return len(self.whole)

    def batch(self, rows: np.ndarray) -> Batch:
        if len(rows) == self.n and np.array_equal(rows, np.arange(self.n)):
            return self.whole
        return subset(self.whole, torch.as_tensor(rows, device=self.whole.index.device))


def subset(batch: Batch, rows: torch.Tensor) -> Batch:
    return replace(batch, x={m: v[rows] for m, v in batch.x.items()},
                   lengths={m: v[rows] for m, v in batch.lengths.items()}, present=batch.present[rows],
                   y=None if batch.y is None else batch.y[rows], index=batch.index[rows])


def drop_modality(batch: Batch, modality: str) -> Batch:
    """The batch with one modality zeroed for every sample (CASP's and the baselines' view)."""
    return replace(batch, x={m: torch.zeros_like(v) if m == modality else v for m, v in batch.x.items()})


def random_drop_view(batch: Batch) -> Batch:
    """Zero one modality, drawn uniformly, for the whole batch."""
    names = list(batch.x)
    return drop_modality(batch, names[int(torch.randint(len(names), ()))])


def layer_norm_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Affine weight and bias of the LayerNorms inside stacked layers (any ``nn.ModuleList`` element,
    e.g. each transformer layer's two norms); final norms outside the stacks stay out."""
    stacked = [f"{name}.{i}." for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList)
               for i in range(len(mod))]
    params = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.LayerNorm) and mod.elementwise_affine and any(f"{name}.".startswith(p) for p in stacked):
            params += [p for p in (mod.weight, mod.bias) if p is not None]
    if not params:
        raise ValueError(f"{type(model).__name__} has no LayerNorm inside a layer stack: nothing for a norm-only adapter")
    return params


def only_trainable(model: nn.Module, params: list[nn.Parameter]) -> list[nn.Parameter]:
    """Freeze every parameter but ``params``; return them."""
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return params


def clipped_step(optimiser: torch.optim.Optimizer, loss: torch.Tensor, clip: float) -> None:
    """One optimiser step with the gradient norm of its parameters clipped to ``clip``."""
    optimiser.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in optimiser.param_groups for p in g["params"]], clip)
    optimiser.step()


class TestTimeAdapter:
    name = "base"
    #: True: ``adapt`` runs on the target's train split before ``predict`` (which then never updates).
    offline = False
    #: True only for runs that read target labels (through ``validate``); the table marks them.
    uses_target_labels = False
    #: True: built with ``source_stats``, the feature statistics the backbone job saved (SSA).
    needs_source_stats = False

    def __init__(self, model: nn.Module):
        """Every parameter frozen: an adapter updates only what it names (the counts report that)."""
        self.model = model.requires_grad_(False)

    def adapt(self, pool: Pool, on_epoch: EpochCallback | None = None, validate: Validate | None = None) -> None:
        """Offline adaptation on an unlabelled pool; online adapters have nothing to do here."""

    def predict(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError


@ADAPTERS.register("source_only")
class SourceOnly(TestTimeAdapter):
    """The source model as trained: evaluation mode, no gradient, no update."""

    @torch.no_grad()
    def predict(self, batch: Batch) -> torch.Tensor:
        self.model.eval()
        return self.model(batch).pred
