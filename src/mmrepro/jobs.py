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
from mmrepro.methods.adapters import SplitPool
from mmrepro.methods.balance.utilisation import with_utilisation
from mmrepro.methods.registry import ADAPTERS, HOOKS, SETTINGS, TRANSFORMS, build, plugin_class
from mmrepro.methods.transforms import count_parameters
from mmrepro.methods.tta_baselines import feature_statistics
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

    def loader(self, split: str, shuffle: bool = False, target: bool = False) -> SplitLoader:
        """``target``: the data setting's target version of ``split`` (what a test-time adapter reads)."""
        name = self.setting.target_split(split) if target else self.setting.split_name(split)
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
    """The weights with what rebuilds their module tree: the model config and the transform applied to it."""
    tmp = path.with_suffix(".tmp")
    transform = spec["plan"]["transform"]
    torch.save({"state_dict": model.state_dict(), "model": spec["model"], "task": spec["task"],
                "transform": {"name": transform, "params": spec["method_params"][transform]}}, tmp)
    os.replace(tmp, path)


def _load_trained(data: RunData, spec: dict[str, Any], path: Path) -> torch.nn.Module:
    """A model trained by any study, rebuilt as it was trained: its own model config (not this run's)
    and its transform's modules (a peft method's), then its weights."""
    saved = torch.load(path, map_location="cpu")
    model = _model(data, {**spec, "model": saved.get("model", spec["model"])})
    transform = saved.get("transform")
    if transform is not None:
        model = build(TRANSFORMS, transform["name"], transform["params"]).apply(model)
    _load_backbone(model, path)
    return model


def _save_feature_stats(model: torch.nn.Module, loader: SplitLoader, path: Path, device: str) -> None:
    """Statistics of the source features (the head's input) on the train split, for SSA at test time."""
    model.eval()
    with torch.no_grad():
        features = torch.cat([model(b.to(device)).fused.cpu() for b in loader]).double()
    tmp = path.with_suffix(".tmp")
    torch.save({k: v.float() for k, v in feature_statistics(features).items()}, tmp)
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
    model = build(TRANSFORMS, spec["plan"]["transform"], spec["method_params"][spec["plan"]["transform"]]).apply(model)
    hook = build(HOOKS, spec["plan"]["hook"], spec["method_params"][spec["plan"]["hook"]])
    if spec["utilisation_probes"] and data.task.type == "segmentation":
        log.warning("utilisation probes predict one label per sample; skipped for the segmentation task %r",
                    data.task.name)
    elif spec["utilisation_probes"]:
        hook = with_utilisation(hook)
    trainable, total = count_parameters(model)
    uri = tracking_uri(spec["results"], spec["tracking_uri"])
    with RunTracker(uri, spec["study"], spec, threads, run_name=out_dir.as_posix()) as run:
        cfg = TrainConfig(**spec["train"])
        result = fit(model, train, valid, hook, cfg,
                     log_epoch=lambda epoch, values: run.log_metrics(values, step=epoch),
                     checkpoint=out_dir / "last.ckpt", checkpoint_key=json.dumps(spec, sort_keys=True))
        model.load_state_dict(result.best_state)
        metrics = {split: evaluate_model(model, data.loader(split), data.task, cfg.torch_device)
                   for split in ("valid", "test")}
        summary = _summary(spec, data, metrics=metrics, oracle={s: data.oracle(s) for s in ("valid", "test") if data.oracle(s)},
                           best_epoch=result.best_epoch, epochs_run=result.epochs_run,
                           trainable_params=trainable, total_params=total)
        _finish(run, out_dir, spec, summary, result.history)
        _save_model(model, out_dir / "model.pt", spec)
        if spec.get("feature_stats"):
            _save_feature_stats(model, data.loader("train"), out_dir / "feature_stats.pt", cfg.torch_device)
    (out_dir / "last.ckpt").unlink(missing_ok=True)
    return summary


def adapt_job(spec: dict[str, Any], store: Path, model_path: Path, out_dir: Path, threads: int,
              source_stats: Path | None = None) -> dict[str, Any]:
    """Adapt a trained model to the spec's target with the spec's test-time adapter; score the target test split.

    An offline adapter first adapts on the target's unlabelled train split; the target test error
    is recorded before and after each of its epochs. An online adapter adapts as the test stream
    passes; the error of each batch is recorded. Labels never reach the adapter, except the target
    validation callback of one that declares label use (then ``target_labels_used`` is true).
    """
    reproducibility.configure(spec["seed"], threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = RunData(store, spec)
    if data.task.type == "segmentation":
        raise ValueError(f"test-time adaptation is not supported for segmentation (task {data.task.name!r})")
    model = _load_trained(data, spec, model_path)
    device = TrainConfig(**spec["train"]).torch_device
    model.to(device)
    name = spec["plan"]["adapter"]
    context: dict[str, Any] = {"model": model}
    if plugin_class(ADAPTERS, name).needs_source_stats:
        if source_stats is None or not Path(source_stats).is_file():
            raise ValueError(f"adapter {name!r} needs the source feature statistics the backbone job saves "
                             f"(feature_stats.pt); got {source_stats}")
        context["source_stats"] = source_stats
    adapter = build(ADAPTERS, name, spec["method_params"][name], **context)
    uri = tracking_uri(spec["results"], spec["tracking_uri"])
    history: list[dict[str, float]] = []

    def error(pred: np.ndarray, y: np.ndarray) -> float:
        return float(np.abs(pred - y).mean()) if data.task.type == "regression" else float((pred.argmax(-1) != y).mean())

    with RunTracker(uri, spec["study"], spec, threads, run_name=out_dir.as_posix()) as run:
        def record(unit: str, step: int, value: float, suffix: str = "") -> None:
            history.append({unit: step, f"target_error{suffix}": value})
            run.log_metrics({f"target_error_per_{unit}": value}, step=step)

        if adapter.offline:
            def on_epoch(epoch: int) -> None:
                record("epoch", epoch, error(*predict(adapter.predict, data.loader("test"), device)))

            validate = None
            if adapter.uses_target_labels:
                validate = lambda: evaluate_model(model, data.loader("valid", target=True), data.task, device)  # noqa: E731
            on_epoch(0)
            adapter.adapt(SplitPool(data.loader("train", target=True), device), on_epoch=on_epoch, validate=validate)
            pred, y = predict(adapter.predict, data.loader("test"), device)
        else:
            pred, y = predict(adapter.predict, data.loader("test"), device,
                              on_batch=lambda step, p, y: record("batch", step, error(p, y), "_per_batch"))
        trainable, total = count_parameters(model)
        summary = _summary(spec, data, metrics={"test": score(data.task, pred, y)},
                           oracle={"test": data.oracle("test")} if data.oracle("test") else {},
                           protocol="offline" if adapter.offline else "online",
                           target_labels_used=adapter.uses_target_labels,
                           trainable_params=trainable, total_params=total)
        _finish(run, out_dir, spec, summary, history)
    return summary


def _finish(run: RunTracker, out_dir: Path, spec: dict[str, Any], summary: dict[str, Any],
            history: list[dict[str, float]]) -> None:
    """Write the run's files and log the final metrics and the files to MLflow."""
    write_json(out_dir / "config.json", spec)
    write_json(out_dir / "history.json", history)
    write_json(out_dir / "metrics.json", summary)
    final = {f"{split}_{k}": v for split, values in summary["metrics"].items() for k, v in values.items()}
    run.log_metrics(final, step=summary.get("best_epoch", 0))
    for name in ("config.json", "metrics.json", "history.json"):
        run.log_artifact(out_dir / name)
