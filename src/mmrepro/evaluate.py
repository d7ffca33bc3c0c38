"""Predictions over a split and the literature's metrics on them, for models and test-time adapters."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch

from mmrepro import metrics
from mmrepro.data.loader import Batch, SplitLoader
from mmrepro.data.schema import TaskSpec


def metric_kind(task: TaskSpec) -> str:
    """Which metric family fits a task: MOSI-style regression, SIMS-style ([-1, 1]) or classes."""
    if task.type == "classification":
        return "classification"
    if task.value_range is not None and tuple(task.value_range) == (-1.0, 1.0):
        return "sims_regression"
    return "regression"


def predict(predict_fn: Callable[[Batch], torch.Tensor], loader: SplitLoader, device: str = "cpu",
            on_batch: Callable[[int, np.ndarray, np.ndarray], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Run ``predict_fn`` over the loader with labels withheld; return (predictions, labels).

    ``predict_fn`` sees each batch with ``y=None``: labels stay here, for scoring only.
    ``on_batch(step, pred, y)`` lets callers record error along a stream.
    """
    preds, ys = [], []
    for step, batch in enumerate(loader):
        pred = predict_fn(replace(batch.to(device), y=None)).detach().cpu().numpy()
        y = batch.y.numpy()
        if on_batch is not None:
            on_batch(step, pred, y)
        preds.append(pred)
        ys.append(y)
    return np.concatenate(preds), np.concatenate(ys)


def score(task: TaskSpec, pred: np.ndarray, y: np.ndarray) -> dict[str, float]:
    return metrics.compute(metric_kind(task), pred, y)


def evaluate_model(model: torch.nn.Module, loader: SplitLoader, task: TaskSpec, device: str = "cpu") -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        pred, y = predict(lambda b: model(b).pred, loader, device)
    return score(task, pred, y)
