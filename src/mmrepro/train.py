"""The one training loop every method shares (regression, classification and segmentation alike).

Per step: forward, task loss, ``hook.loss`` (extra terms), backward, ``hook.after_backward``
(gradient modulation), gradient clipping, optimizer step; an epoch ends after ``max_steps`` steps
when set (a rehearsal or a cost measurement, not a result). Per epoch: validation loss, the best
weights under ``train.selection`` kept as a ``state_dict`` (:data:`SELECTIONS`), early stopping
after ``patience`` epochs without a new best (an improvement must exceed ``min_delta``: otherwise
a loss that falls by rounding noise alone, a few ULPs an epoch, would reset the patience forever),
a resumable checkpoint, and one call of ``log_epoch(epoch, values)`` for tracking.
"""

from __future__ import annotations

import copy
import itertools
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
from mmrepro.metrics import official_acc2
from mmrepro.optim import EpochSchedule, build_optimizer
from mmrepro.progress import progress_disabled
from mmrepro.spec import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    best_state: dict[str, torch.Tensor]
    best_epoch: int
    epochs_run: int
    history: list[dict[str, float]] = field(default_factory=list)


#: CGGM's class weights for BraTS (background, necrotic core, oedema, enhancing tumour), from its
#: ``src/segtrain.py``; the default of :func:`segmentation_loss` when there are 4 classes.
BRATS_CLASS_WEIGHTS = (0.2, 0.3, 0.25, 0.25)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean", *,
                      class_weights: tuple[float, ...] | None = None, alpha: float = 0.5,
                      smooth: float = 0.01) -> torch.Tensor:
    """CGGM's BraTS loss (``SegLoss`` of its ``src/eval_metrics.py``), for any number of spatial axes.

    ``(1 - alpha) * CE_w + alpha * (1 - Dice_fg)``: ``CE_w`` is class-weighted cross-entropy
    averaged with the weights (``sum_v w[y_v] ce_v / sum_v w[y_v]``, PyTorch's weighted mean);
    ``Dice_fg = 2 sum p_c g_c / (sum p_c + sum g_c + smooth)`` over the foreground classes
    ``c >= 1`` pooled together (softmax probabilities ``p``, one-hot truth ``g``; ``smooth`` only in
    the denominator, as the code). ``class_weights`` default to :data:`BRATS_CLASS_WEIGHTS` for 4
    classes, else equal. ``logits`` ``(B, K, *S)``, ``target`` int64 ``(B, *S)``.

    ``reduction="mean"`` pools both terms over the whole batch (the official training loss);
    ``"none"`` gives each sample's loss computed alone (pooled over its own voxels) and ``"sum"``
    their sum, so the loop's validation loss (``sum / n``) is a mean over cases that does not
    depend on the batch size. For one-sample batches the three agree.
    """
    k = logits.shape[1]
    if class_weights is None:
        class_weights = BRATS_CLASS_WEIGHTS if k == len(BRATS_CLASS_WEIGHTS) else (1.0,) * k
    if len(class_weights) != k:
        raise ValueError(f"segmentation_loss: {len(class_weights)} class weights for {k} classes")
    weight = logits.new_tensor(class_weights)
    ce = nn.functional.cross_entropy(logits, target, weight=weight, reduction="none")  # w[y] * ce per voxel
    w = weight[target]
    prob = logits.softmax(1)
    fg = target > 0
    inter = prob.gather(1, target.unsqueeze(1)).squeeze(1) * fg  # p_{y_v} on foreground voxels
    p_fg = 1.0 - prob[:, 0]  # sum of the foreground probabilities per voxel
    if reduction == "mean":
        ce_term = ce.sum() / w.sum()
        dice = 2.0 * inter.sum() / (p_fg.sum() + fg.sum() + smooth)
        return (1 - alpha) * ce_term + alpha * (1 - dice)
    if reduction not in ("sum", "none"):
        raise ValueError(f"segmentation_loss: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    per = lambda t: t.flatten(1).sum(1)  # noqa: E731
    ce_term = per(ce) / per(w)
    dice = 2.0 * per(inter) / (per(p_fg) + per(fg) + smooth)
    losses = (1 - alpha) * ce_term + alpha * (1 - dice)
    return losses.sum() if reduction == "sum" else losses


def task_loss_fn(task_type: str) -> Callable[..., torch.Tensor]:
    """L1 for regression (as the sentiment literature trains), cross-entropy for classes,
    :func:`segmentation_loss` (CGGM's weighted CE + soft Dice) for segmentation."""
    if task_type == "segmentation":
        return segmentation_loss
    return nn.functional.l1_loss if task_type == "regression" else nn.functional.cross_entropy


#: ``train.selection``: which epoch's weights a run keeps, and what ``patience`` waits for.
#: ``valid_loss`` (default; MPLMM's released code): the lowest validation loss.
#: ``valid_accuracy`` (CGGM's, CASP's and Wander's released code): the highest validation accuracy
#: as that code counts it (:func:`code_accuracy`), strictly above the best so far, which starts at
#: 0 as in the code (an epoch at accuracy 0 is never kept; if none beats 0 the initial weights stay).
SELECTIONS = ("valid_loss", "valid_accuracy")


def code_accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    """The released codes' validation accuracy: Acc-2 with ``> 0`` on predictions and labels over every
    sample for a regression (``eval_senti``: a zero label counts as negative), top-1 for classes."""
    if pred.ndim == 1:
        return official_acc2(pred.numpy(), y.numpy())
    return float((pred.argmax(-1) == y).double().mean())


def selection_score(values: dict[str, float], selection: str) -> float:
    """An epoch's score under ``selection``, lower is better (minus the accuracy)."""
    return values["valid_loss"] if selection == "valid_loss" else -values["valid_accuracy"]


def _check_selection(cfg: TrainConfig, task_type: str) -> None:
    if cfg.selection not in SELECTIONS:
        raise ValueError(f"train.selection must be one of {SELECTIONS}, got {cfg.selection!r}")
    if cfg.selection == "valid_accuracy" and task_type not in ("regression", "classification"):
        raise ValueError(f"train.selection valid_accuracy needs a regression or classification task, "
                         f"not {task_type!r}")


@torch.no_grad()
def validation_values(model: nn.Module, loader: SplitLoader, loss_fn, cfg: TrainConfig) -> dict[str, float]:
    """``valid_loss`` (the mean per-sample loss) and, where ``train.selection`` needs it, ``valid_accuracy``."""
    model.eval()
    total, n, preds, ys = 0.0, 0, [], []
    for batch in loader:
        batch = batch.to(cfg.torch_device, pin=cfg.pin_memory)
        with cfg.autocast():
            pred = model(batch).pred
        total += float(loss_fn(pred.float(), batch.y, reduction="sum"))
        n += len(batch)
        if cfg.selection == "valid_accuracy":
            preds.append(pred.float().cpu())
            ys.append(batch.y.cpu())
    values = {"valid_loss": total / max(n, 1)}
    if preds:
        values["valid_accuracy"] = code_accuracy(torch.cat(preds), torch.cat(ys))
    return values


def _check_batch_norm(model: nn.Module, train: SplitLoader, steps: int) -> None:
    """BatchNorm cannot train on a batch of one sample (a 1x1 map, e.g. DeepLab's pooled ASPP branch, has a
    single value per channel): refuse before the first step a split whose last batch would be one, which
    would otherwise stop the run at the end of its first epoch."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()) and steps == len(train) \
            and train.n % train.batch_size == 1:
        raise ValueError(f"train.batch_size {train.batch_size}: the training split's {train.n} samples end in a "
                         "batch of one, which the model's BatchNorm layers cannot train on; choose a batch size "
                         "that leaves at least 2 in the last batch")


def fit(model: nn.Module, train: SplitLoader, valid: SplitLoader, hook: TrainingHook, cfg: TrainConfig, *,
        log_epoch: Callable[[int, dict[str, float]], None] = lambda e, v: None,
        checkpoint: Path | None = None, checkpoint_key: str = "") -> FitResult:
    """Train, keeping the best epoch under ``train.selection`` and stopping after ``patience`` epochs
    without one; resume from ``checkpoint`` if it matches ``checkpoint_key``."""
    _check_selection(cfg, model.task_type)
    loss_fn = task_loss_fn(model.task_type)
    device = cfg.torch_device
    steps = len(train) if cfg.max_steps is None else min(len(train), cfg.max_steps)
    _check_batch_norm(model, train, steps)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    schedule = EpochSchedule(optimizer, cfg.scheduler, lr=cfg.lr, epochs=cfg.epochs, when=cfg.when, factor=cfg.factor,
                             warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr,
                             steps_per_epoch=steps)
    hook.setup(model, loss_fn, optimizer)
    state = {"epoch": 0, "best_score": float("inf") if cfg.selection == "valid_loss" else -0.0, "best_epoch": 0,
             "bad_epochs": 0, "history": [],
             "best_state": copy.deepcopy(model.state_dict())}
    if checkpoint is not None and checkpoint.is_file():
        saved = torch.load(checkpoint, map_location="cpu")
        if saved.get("key") == checkpoint_key:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            schedule.load_state_dict(saved["schedule"])
            torch.set_rng_state(saved["torch_rng"])
            state = saved["state"]
            if "hook" in saved:  # after setup, model and optimizer: the hook's modules and optimizers exist
                hook.load_state_dict(saved["hook"])
            train.epoch = valid.epoch = state["epoch"]
            log.info("resumed from %s after epoch %d", checkpoint, state["epoch"])
    while state["epoch"] < cfg.epochs and state["bad_epochs"] < cfg.patience:
        epoch = state["epoch"] + 1
        model.train()
        total, n = 0.0, 0
        for step, batch in enumerate(tqdm(itertools.islice(train, steps), total=steps, desc=f"epoch {epoch}/{cfg.epochs}",
                                          leave=False, disable=progress_disabled())):
            schedule.before_step(step)
            batch = batch.to(device, pin=cfg.pin_memory)
            with cfg.autocast():
                out = model(batch)
                task_loss = loss_fn(out.pred.float(), batch.y)
                loss = hook.loss(model, batch, out, task_loss)
                if out.aux_loss is not None:  # the model's own objective (e.g. a reconstruction loss)
                    loss = loss + out.aux_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            hook.after_backward(model, batch, out)
            if cfg.clip:
                nn.utils.clip_grad_norm_(params, cfg.clip)
            optimizer.step()
            total += task_loss.item() * len(batch)
            n += len(batch)
        values = {"train_loss": total / max(n, 1), **validation_values(model, valid, loss_fn, cfg)}
        values.update(hook.on_epoch_end(epoch, model, valid))
        values["lr"] = optimizer.param_groups[0]["lr"]
        schedule.step(values["valid_loss"])
        score = selection_score(values, cfg.selection)
        if score < state["best_score"] - cfg.min_delta:
            state.update(best_score=score, best_epoch=epoch, bad_epochs=0,
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
                        "schedule": schedule.state_dict(), "torch_rng": torch.get_rng_state(), "state": state,
                        "hook": hook.state_dict()}, tmp)
            os.replace(tmp, checkpoint)
    return FitResult(best_state=state["best_state"], best_epoch=state["best_epoch"], epochs_run=state["epoch"],
                     history=state["history"])
