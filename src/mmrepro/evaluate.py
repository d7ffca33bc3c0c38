"""Predictions over a split and the literature's metrics on them, for models and test-time adapters.

Segmentation is scored per case as batches arrive (:class:`mmrepro.metrics.DiceMeter`: argmax
over classes, BraTS Dice of ET/TC/WT per case, averaged over cases), so a split of volumes is
never held in memory as logits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

import numpy as np
import torch

from mmrepro import metrics
from mmrepro.data.loader import Batch, SplitLoader
from mmrepro.data.schema import TaskSpec


def metric_kind(task: TaskSpec) -> str:
    """Which metric family fits a task: MOSI-style regression, SIMS-style ([-1, 1]), classes or
    segmentation (BraTS Dice)."""
    if task.type in ("classification", "segmentation"):
        return task.type
    if task.value_range is not None and tuple(task.value_range) == (-1.0, 1.0):
        return "sims_regression"
    return "regression"


def batch_predictions(predict_fn: Callable[[Batch], torch.Tensor], loader: SplitLoader,
                      device: str = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(prediction, labels)`` per batch; ``predict_fn`` sees each batch with ``y=None``."""
    for batch in loader:
        yield predict_fn(replace(batch.to(device), y=None)).detach(), batch.y


def predict(predict_fn: Callable[[Batch], torch.Tensor], loader: SplitLoader, device: str = "cpu",
            on_batch: Callable[[int, np.ndarray, np.ndarray], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Run ``predict_fn`` over the loader with labels withheld; return (predictions, labels).

    ``predict_fn`` sees each batch with ``y=None``: labels stay here, for scoring only.
    ``on_batch(step, pred, y)`` lets callers record error along a stream.
    """
    preds, ys = [], []
    for step, (pred, y) in enumerate(batch_predictions(predict_fn, loader, device)):
        pred, y = pred.cpu().numpy(), y.numpy()
        if on_batch is not None:
            on_batch(step, pred, y)
        preds.append(pred)
        ys.append(y)
    return np.concatenate(preds), np.concatenate(ys)


def segmentation_labels(pred: np.ndarray | torch.Tensor, y_shape: tuple[int, ...]):
    """Label volumes from logits ``(N, K, *S)`` (argmax over K) or labels ``(N, *S)`` as they are."""
    if pred.ndim == len(y_shape) + 1:
        return pred.argmax(1)
    if tuple(pred.shape) != tuple(y_shape):
        raise ValueError(f"segmentation predictions must be logits (N, K, *S) or labels (N, *S) for labels "
                         f"{tuple(y_shape)}; got shape {tuple(pred.shape)}")
    return pred


def score(task: TaskSpec, pred: np.ndarray, y: np.ndarray) -> dict[str, float]:
    kind = metric_kind(task)
    if kind == "segmentation":
        return metrics.segmentation_metrics(segmentation_labels(pred, y.shape), y)
    return metrics.compute(kind, pred, y)


def model_predictions(model: torch.nn.Module, loader: SplitLoader, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """The model's predictions over ``loader`` (eval mode, no gradients) and the labels, in the loader's order."""
    model.eval()
    with torch.no_grad():
        return predict(lambda b: model(b).pred, loader, device)


def evaluate_model(model: torch.nn.Module, loader: SplitLoader, task: TaskSpec, device: str = "cpu") -> dict[str, float]:
    if metric_kind(task) == "segmentation":
        model.eval()
        meter = metrics.DiceMeter()
        with torch.no_grad():
            for logits, y in batch_predictions(lambda b: model(b).pred, loader, device):
                meter.update(segmentation_labels(logits, tuple(y.shape)).to(torch.uint8).cpu().numpy(), y.numpy())
        return meter.result()
    return score(task, *model_predictions(model, loader, device))


def case_average(metrics: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """``{"test:avg": ...}``: each metric's mean over the ``test:available:...`` cases (at least two
    of them, all multi-case settings), else ``{}``."""
    cases = [v for k, v in metrics.items() if k.startswith("test:available:")]
    if len(cases) < 2:
        return {}
    return {"test:avg": {k: float(np.mean([c[k] for c in cases])) for k in cases[0]}}
