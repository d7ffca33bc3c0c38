"""What one pipeline job does, from run spec to files: train, fine-tune from a backbone, or adapt.

Each job seeds and threads itself, opens the feature store, builds the model and the method's
plug-ins from the registries, runs, and writes ``metrics.json`` (deterministic content only),
``config.json`` (the run spec), ``history.json`` and ``model.pt`` into its output folder, logging
the same to MLflow as one run.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmrepro import reproducibility
from mmrepro.data.loader import SplitLoader
from mmrepro.data.store import FeatureStore
from mmrepro.evaluate import evaluate_model, metric_kind, predict, score
from mmrepro.methods.balance.utilisation import with_utilisation
from mmrepro.methods.registry import ADAPTERS, HOOKS, SETTINGS, TRANSFORMS, build
from mmrepro.methods.transforms import count_parameters
from mmrepro.models.multimodal import build_model
from mmrepro.models.segmentation import BACKBONE as SEGMENTATION_BACKBONE
from mmrepro.models.segmentation import check_method_support
from mmrepro.tracking import RunTracker, tracking_uri
from mmrepro.train import TrainConfig, fit

log = logging.getLogger(__name__)


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


class RunData:
    """A store opened for one run: its task, data setting and loaders for any split."""

    def __init__(self, store_path: Path, spec: dict[str, Any]):
        self.store = FeatureStore(store_path)
        self.schema = self.store.schema
        self.task = self.schema.task(spec["task"])
        self.setting = build(SETTINGS, spec["data_setting"]["type"], spec["data_setting"]["params"])
        self.modalities = self.setting.modalities(self.schema.modality_names)
        self.batch_size, self.seed = spec["train"]["batch_size"], spec["seed"]

    def loader(self, split: str, shuffle: bool = False) -> SplitLoader:
        name = self.setting.split_name(split)
        arrays = self.store.open_split(name)
        n, m = len(arrays["ids"]), len(self.schema.modalities)
        base = np.asarray(arrays["present"]) if "present" in arrays else np.ones((n, m), dtype=bool)
        return SplitLoader(arrays, self.schema, self.task.name, batch_size=self.batch_size, shuffle=shuffle,
                           seed=self.seed, present=self.setting.present(name, base), transform=self.setting.transform,
                           modalities=self.modalities)

    def oracle(self, split: str) -> dict[str, float]:
        return self.store.oracle(self.setting.split_name(split), self.task.name)


def _model(data: RunData, spec: dict[str, Any]) -> torch.nn.Module:
    return build_model(data.schema, data.task, modalities=data.modalities, **spec["model"])


def _save_model(model: torch.nn.Module, path: Path, spec: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"state_dict": model.state_dict(), "model": spec["model"], "task": spec["task"]}, tmp)
    os.replace(tmp, path)


def _load_backbone(model: torch.nn.Module, path: Path) -> None:
    saved = torch.load(path, map_location="cpu")
    missing, unexpected = model.load_state_dict(saved["state_dict"], strict=False)
    if unexpected or missing:
        raise ValueError(f"{path}: checkpoint does not fit the model (missing {missing}, unexpected {unexpected})")


def _summary(spec: dict[str, Any], data: "RunData", **extra: Any) -> dict[str, Any]:
    """The identifying part of metrics.json; ``task`` is the metric family, ``label`` the task's name."""
    keys = ("study", "dataset", "method", "setting", "seed")
    backbone = spec["model"]["backbone"]
    if data.task.type == "segmentation":  # the study's backbone key names its sequence fusion, unused here
        backbone = SEGMENTATION_BACKBONE
    return {**{k: spec[k] for k in keys}, "task": metric_kind(data.task), "label": spec["task"],
            "backbone": backbone, **extra}


def train_job(spec: dict[str, Any], store: Path, out_dir: Path, threads: int, init: Path | None = None) -> dict[str, Any]:
    """Train (or fine-tune from ``init``) with the spec's transform and hook; evaluate valid and test."""
    reproducibility.configure(spec["seed"], threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = RunData(store, spec)
    check_method_support(data.task, spec["plan"])  # before anything is built: a clear error, not a traceback
    train, valid = data.loader("train", shuffle=True), data.loader("valid")
    model = _model(data, spec)
    if init is not None:
        _load_backbone(model, init)
    backbone = count_parameters(model)[1]  # before the transform: the denominator of a method's share
    model = build(TRANSFORMS, spec["plan"]["transform"], spec["method_params"][spec["plan"]["transform"]]).apply(model)
    hook = build(HOOKS, spec["plan"]["hook"], spec["method_params"][spec["plan"]["hook"]])
    if spec["utilisation_probes"] and data.task.type == "segmentation":
        log.warning("utilisation probes predict one label per sample; skipped for the segmentation task %r",
                    data.task.name)
    elif spec["utilisation_probes"]:
        hook = with_utilisation(hook)
    trainable, total = count_parameters(model)
    uri = tracking_uri(spec["results"], spec["tracking_uri"])
    with RunTracker(uri, spec["study"], spec, threads) as run:
        cfg = TrainConfig(**spec["train"])
        result = fit(model, train, valid, hook, cfg,
                     log_epoch=lambda epoch, values: run.log_metrics(values, step=epoch),
                     checkpoint=out_dir / "last.ckpt", checkpoint_key=json.dumps(spec, sort_keys=True))
        model.load_state_dict(result.best_state)
        metrics = {split: evaluate_model(model, data.loader(split), data.task, cfg.torch_device)
                   for split in ("valid", "test")}
        summary = _summary(spec, data, metrics=metrics, oracle={s: data.oracle(s) for s in ("valid", "test") if data.oracle(s)},
                           best_epoch=result.best_epoch, epochs_run=result.epochs_run,
                           trainable_params=trainable, total_params=total, backbone_params=backbone)
        _finish(run, out_dir, spec, summary, result.history)
        _save_model(model, out_dir / "model.pt", spec)
    (out_dir / "last.ckpt").unlink(missing_ok=True)
    return summary


def adapt_job(spec: dict[str, Any], store: Path, model_path: Path, out_dir: Path, threads: int) -> dict[str, Any]:
    """Adapt a trained model to the spec's target split with the spec's test-time adapter."""
    reproducibility.configure(spec["seed"], threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = RunData(store, spec)
    if data.task.type == "segmentation":
        raise ValueError(f"test-time adaptation is not supported for segmentation (task {data.task.name!r})")
    model = _model(data, spec)
    _load_backbone(model, model_path)
    device = TrainConfig(**spec["train"]).torch_device
    model.to(device)
    adapter = build(ADAPTERS, spec["plan"]["adapter"], spec["method_params"][spec["plan"]["adapter"]], model=model)
    uri = tracking_uri(spec["results"], spec["tracking_uri"])
    history: list[dict[str, float]] = []
    with RunTracker(uri, spec["study"], spec, threads) as run:
        def on_batch(step: int, pred: np.ndarray, y: np.ndarray) -> None:
            values = {"stream_batch_loss": float(np.abs(pred - y).mean()) if data.task.type == "regression"
                      else float((pred.argmax(-1) != y).mean())}
            history.append({"step": step, **values})
            run.log_metrics(values, step=step)

        pred, y = predict(adapter.predict, data.loader("test"), device, on_batch=on_batch)
        trainable, total = count_parameters(model)
        summary = _summary(spec, data, metrics={"test": score(data.task, pred, y)},
                           oracle={"test": data.oracle("test")} if data.oracle("test") else {},
                           trainable_params=trainable, total_params=total, backbone_params=total)
        _finish(run, out_dir, spec, summary, history)
    return summary


def _finish(run: RunTracker, out_dir: Path, spec: dict[str, Any], summary: dict[str, Any],
            history: list[dict[str, float]]) -> None:
    """Write the run's files and log the final metrics and the files to MLflow."""
    write_json(out_dir / "config.json", spec)
    write_json(out_dir / "history.json", history)
    write_json(out_dir / "metrics.json", summary)
    run.log_summary(summary)
    for name in ("config.json", "metrics.json", "history.json"):
        run.log_artifact(out_dir / name)
