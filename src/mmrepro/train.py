"""The one training loop every method shares (regression and classification alike).

Per step: forward, task loss, ``hook.loss`` (extra terms), backward, ``hook.after_backward``
(gradient modulation), gradient clipping, optimizer step. Per epoch: validation loss, early
stopping with patience, the best weights kept as a ``state_dict``, a resumable checkpoint, and
one call of ``log_epoch(epoch, values)`` for tracking.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from mmrepro.data.loader import SplitLoader
from mmrepro.methods.hooks import TrainingHook
from mmrepro.progress import progress_disabled

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    patience: int = 5
    clip: float | None = 1.0
    device: str = "auto"

    @property
    def torch_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device


@dataclass
class FitResult:
    best_state: dict[str, torch.Tensor]
    best_epoch: int
    epochs_run: int
    history: list[dict[str, float]] = field(default_factory=list)


def task_loss_fn(task_type: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """L1 for regression (as the sentiment literature trains), cross-entropy for classes."""
    return nn.functional.l1_loss if task_type == "regression" else nn.functional.cross_entropy


@torch.no_grad()
def validation_loss(model: nn.Module, loader: SplitLoader, loss_fn, device: str) -> float:
    model.eval()
    total, n = 0.0, 0
    for batch in loader:
        batch = batch.to(device)
        total += float(loss_fn(model(batch).pred, batch.y, reduction="sum"))
        n += len(batch)
    return total / max(n, 1)


def fit(model: nn.Module, train: SplitLoader, valid: SplitLoader, hook: TrainingHook, cfg: TrainConfig, *,
        log_epoch: Callable[[int, dict[str, float]], None] = lambda e, v: None,
        checkpoint: Path | None = None, checkpoint_key: str = "") -> FitResult:
    """Train with early stopping on validation loss; resume from ``checkpoint`` if it matches ``checkpoint_key``."""
    loss_fn = task_loss_fn(model.task_type)
    device = cfg.torch_device
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    hook.setup(model, loss_fn, optimizer)
    state = {"epoch": 0, "best_loss": float("inf"), "best_epoch": 0, "bad_epochs": 0, "history": [],
             "best_state": copy.deepcopy(model.state_dict())}
    if checkpoint is not None and checkpoint.is_file():
        saved = torch.load(checkpoint, map_location="cpu")
        if saved.get("key") == checkpoint_key:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            torch.set_rng_state(saved["torch_rng"])
            state = saved["state"]
            train.epoch = valid.epoch = state["epoch"]
            log.info("resumed from %s after epoch %d", checkpoint, state["epoch"])
    while state["epoch"] < cfg.epochs and state["bad_epochs"] < cfg.patience:
        epoch = state["epoch"] + 1
        model.train()
        total, n = 0.0, 0
        for batch in tqdm(train, desc=f"epoch {epoch}/{cfg.epochs}", leave=False, disable=progress_disabled()):
            batch = batch.to(device)
            out = model(batch)
            task_loss = loss_fn(out.pred, batch.y)
            loss = hook.loss(model, batch, out, task_loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            hook.after_backward(model, batch, out)
            if cfg.clip:
                nn.utils.clip_grad_norm_(params, cfg.clip)
            optimizer.step()
            total += task_loss.item() * len(batch)
            n += len(batch)
        values = {"train_loss": total / max(n, 1), "valid_loss": validation_loss(model, valid, loss_fn, device)}
        values.update(hook.on_epoch_end(epoch, model, valid))
        if values["valid_loss"] < state["best_loss"]:
            state.update(best_loss=values["valid_loss"], best_epoch=epoch, bad_epochs=0,
                         best_state=copy.deepcopy(model.state_dict()))
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        state["history"].append({"epoch": epoch, **values})
        log.info("epoch %d: %s", epoch, " ".join(f"{k}={v:.4f}" for k, v in values.items()))
        log_epoch(epoch, values)
        if checkpoint is not None:
            tmp = checkpoint.with_suffix(".tmp")
            torch.save({"key": checkpoint_key, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "torch_rng": torch.get_rng_state(), "state": state}, tmp)
            os.replace(tmp, checkpoint)
    return FitResult(best_state=state["best_state"], best_epoch=state["best_epoch"], epochs_run=state["epoch"],
                     history=state["history"])
