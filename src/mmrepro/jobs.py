"""What one pipeline job does, from run spec to files: train, fine-tune from a backbone, or adapt.

Each job seeds and threads itself, opens the feature store, builds the model and the method's
plug-ins from the registries, runs, and writes ``metrics.json`` (deterministic content only),
``config.json`` (the run spec), ``history.json``, ``model.pt``, ``timings.json`` (seconds per
phase) and ``tracking.json`` into its output folder, and logs the same to MLflow as one run, live
or later (:func:`mmrepro.tracking.open_run`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmrepro import checkpoints, reproducibility
from mmrepro.data.loader import SliceSampling, SplitLoader
from mmrepro.data.schema import DataValidationError
from mmrepro.data.store import MANIFEST, FeatureStore
from mmrepro.evaluate import case_average, evaluate_model, metric_kind, model_predictions, predict, score
from mmrepro.methods.adapters import SplitPool
from mmrepro.methods.balance.utilisation import with_utilisation
from mmrepro.methods.registry import ADAPTERS, HOOKS, SETTINGS, TRANSFORMS, build
from mmrepro.methods.transforms import count_parameters
from mmrepro.methods.tta_baselines import feature_statistics
from mmrepro.models.build import build_model
from mmrepro.models.segmentation import BACKBONE as SEGMENTATION_BACKBONE
from mmrepro.models.segmentation import SEGMENTATION_BACKBONES
from mmrepro.models.segmentation import check_method_support
from mmrepro.phases import Phases
from mmrepro.spec import CheckpointSpec, DataSetting, RunSpec
from mmrepro.tracking import (DeferredRun, RunTracker, cluster_store_problem, log_outcome, open_run, record,
                              tracking_mode, tracking_uri)
from mmrepro.train import fit

log = logging.getLogger(__name__)


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


class RunData:
    """A store opened for one run: its task, data setting and loaders for any split."""

    def __init__(self, store_path: Path, spec: RunSpec):
        self._open(store_path, spec.task, spec.data_setting, spec.train.batch_size, spec.seed, spec.train.shuffle,
                   spec.train.slices, f"dataset {spec.dataset!r}, setting {spec.setting!r}")

    @classmethod
    def for_diagnostic(cls, store_path: Path, task: str, data_setting: DataSetting, batch_size: int,
                       seed: int) -> RunData:
        """A store opened for a measurement that is no pipeline run (the mechanisms diagnostics)."""
        data = cls.__new__(cls)
        data._open(store_path, task, data_setting, batch_size, seed, True, None, f"setting {data_setting.type!r}")
        return data

    def _open(self, store_path: Path, task: str, data_setting: DataSetting, batch_size: int, seed: int,
              shuffle: bool, slices: dict[str, Any] | None, where: str) -> None:
        self.store = FeatureStore(store_path)
        self.schema = self.store.schema
        manifest = str(self.store.root / MANIFEST)
        self.setting = build(SETTINGS, data_setting.type, data_setting.params)
        try:  # names the config could not check before the store existed (real datasets)
            self.task = self.schema.task(task)
            self.modalities = self.setting.modalities(self.schema.modality_names)
        except (KeyError, ValueError) as e:
            raise DataValidationError(f"{e.args[0]} ({where})", file=manifest) from None
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.slices = None if slices is None else SliceSampling(**slices)
        self._checked: set[str] = set()

    def check(self, *splits: str, target: bool = False) -> None:
        """Check the values of the splits a job reads (once each), so bad data fails before compute."""
        for split in splits:
            name = self.setting.target_split(split) if target else self.setting.split_name(split)
            if name not in self._checked:
                self.store.open_split(name, validate=True)
                self._checked.add(name)

    def train_loader(self) -> SplitLoader:
        """The loader a run trains on: the train split, shuffled per epoch unless ``train.shuffle`` is
        false (then in stored order, as the released codes read it), 2-D slices with ``train.slices``."""
        return self.loader("train", shuffle=self.shuffle, training=True)

    def loader(self, split: str, shuffle: bool = False, case: np.ndarray | None = None,
               target: bool = False, training: bool = False) -> SplitLoader:
        """``split``'s loader; ``case`` (a test case's ``(N, M)`` mask) replaces the setting's own draw;
        ``target``: the data setting's target version of ``split`` (what a test-time adapter reads).
        With ``train.slices`` a ``training`` loader (:meth:`train_loader`) draws 2-D slices, the others
        give whole volumes, ``volumes_per_batch`` at a time."""
        self.check(split, target=target)
        name = self.setting.target_split(split) if target else self.setting.split_name(split)
        arrays = self.store.open_split(name)
        n, m = len(arrays["ids"]), len(self.schema.modalities)
        base = np.asarray(arrays["present"]) if "present" in arrays else np.ones((n, m), dtype=bool)
        if case is not None:
            present = base & case
        elif self.setting.redraws(name):
            present = lambda epoch: self.setting.present(name, base, epoch)  # noqa: E731
        else:
            present = self.setting.present(name, base)
        slices = self.slices if training else None
        batch_size = self.slices.volumes_per_batch if self.slices is not None and not training else self.batch_size
        return SplitLoader(arrays, self.schema, self.task.name, batch_size=batch_size, shuffle=shuffle,
                           seed=self.seed, present=present, transform=self.setting.transform,
                           modalities=self.modalities, slices=slices)

    def evaluate(self, model: torch.nn.Module, device: str) -> dict[str, dict[str, float]]:
        """Metrics on valid and test, on each of the setting's test cases (``test:<case>``) and, with
        available-set cases, their mean (``test:avg``, MPLMM's Table 1 "Avg")."""
        out = {split: evaluate_model(model, self.loader(split), self.task, device) for split in ("valid", "test")}
        n = len(self.store.open_split(self.setting.split_name("test"))["ids"])
        for case, mask in self.setting.test_cases(n, self.schema.modality_names).items():
            out[f"test:{case}"] = (out["test"] if mask is None
                                   else evaluate_model(model, self.loader("test", case=mask), self.task, device))
        out.update(case_average(out))
        return out

    def oracle(self, split: str) -> dict[str, float]:
        return self.store.oracle(self.setting.split_name(split), self.task.name)

    def ceiling(self, split: str) -> dict[str, float]:
        return self.store.ceiling(self.setting.split_name(split), self.task.name, self.modalities)


def _model(data: RunData, model: dict[str, Any]) -> torch.nn.Module:
    """The model ``model`` (a run spec's model keys, as a dict) describes, for the run's data."""
    return build_model(data.schema, data.task, modalities=data.modalities, **model)


def _load_trained(data: RunData, spec: RunSpec, path: Path) -> torch.nn.Module:
    """A model trained by any study, checked against the run spec (:mod:`mmrepro.checkpoints`), then
    rebuilt as it was trained: its own model config and its transform's modules (a peft method's),
    then its weights, every one of them (a test-time adapter on another dataset must not start an
    input projection fresh)."""
    ckpt = checkpoints.read(path)
    checkpoints.check(ckpt, spec.checkpoint or spec.model, "the model to adapt")
    model = _model(data, ckpt.model or dataclasses.asdict(spec.model))
    if ckpt.transform is not None:
        model = build(TRANSFORMS, ckpt.transform["name"], ckpt.transform["params"]).apply(model)
    checkpoints.load_weights(model, ckpt, fresh=())
    return model


def _save_feature_stats(model: torch.nn.Module, loader: SplitLoader, path: Path, device: str) -> None:
    """Statistics of the source features (the head's input) on the train split, for SSA at test time."""
    model.eval()
    with torch.no_grad():
        features = torch.cat([model(b.to(device)).fused.cpu() for b in loader]).double()
    tmp = path.with_suffix(".tmp")
    torch.save({k: v.float() for k, v in feature_statistics(features).items()}, tmp)
    os.replace(tmp, path)


def _check_store(spec: RunSpec) -> None:
    """Refuse up front a store that is unsafe for this job: a job that logs live to the default sqlite
    store from a cluster node (a deferred run leaves the store to the local track job)."""
    uri = tracking_uri(spec.results, spec.tracking.uri)
    problem = cluster_store_problem(spec.tracking.uri)
    if problem and tracking_mode(uri, spec.tracking.mode) == "live":
        from mmrepro.config import ConfigError  # only here: jsonschema is no import a job needs

        raise ConfigError(f"config key tracking.uri: {problem}")


def _summary(spec: RunSpec, data: "RunData", **extra: Any) -> dict[str, Any]:
    """The identifying part of metrics.json; ``task`` is the metric family, ``label`` the task's name,
    ``backbone`` the run's name on its study's backbone axis (shift) or else its model's backbone,
    ``stand_in`` (only on random stand-in data) its scale: what the reports mark as no result."""
    keys = ("study", "dataset", "method", "setting", "seed")
    backbone = spec.backbone if spec.backbone is not None else spec.model.backbone
    if data.task.type == "segmentation" and backbone not in SEGMENTATION_BACKBONES:  # a sequence fusion, unused
        backbone = SEGMENTATION_BACKBONE
    marked = {} if spec.stand_in is None else {"stand_in": spec.stand_in}
    return {**{k: getattr(spec, k) for k in keys}, "task": metric_kind(data.task), "label": spec.task,
            "backbone": backbone, **marked, **extra}


def _load_teachers(data: RunData, spec: RunSpec, paths: dict[str, Path]) -> dict[str, torch.nn.Module]:
    """The unimodal runs' models (modality -> model), frozen, for hooks that distil from teachers."""
    teachers = {}
    expected = CheckpointSpec(spec.model, spec.task, "full_finetune")  # the study's joint runs, one modality each
    for m, path in paths.items():
        ckpt = checkpoints.read(path)
        checkpoints.check(ckpt, expected, f"the unimodal {m!r} teacher")
        model = build_model(data.schema, data.task, modalities=[m], **(ckpt.model or dataclasses.asdict(spec.model)))
        checkpoints.load_weights(model, ckpt, fresh=())
        teachers[m] = model.eval().requires_grad_(False)
    return teachers


def prepare_training(spec: RunSpec, data: RunData, init: Path | None = None,
                     teachers: dict[str, Path] | None = None) -> tuple[torch.nn.Module, Any, int]:
    """The model (``init`` loaded, the spec's transform applied), the training hook a run trains with,
    and the model's parameter count before the transform (the denominator of a method's share).

    ``teachers`` (modality -> unimodal run's ``model.pt``) go to a hook that ``needs_teachers`` (UMT).
    """
    check_method_support(data.task, spec.plan)  # before anything is built: a clear error, not a traceback
    backbone_ckpt = None
    if init is not None:
        backbone_ckpt = checkpoints.read(init)
        checkpoints.check(backbone_ckpt, spec.checkpoint or spec.model, "the backbone to fine-tune")
    model = _model(data, dataclasses.asdict(spec.model))
    if backbone_ckpt is not None:
        checkpoints.load_weights(model, backbone_ckpt)
    backbone = count_parameters(model)[1]
    plan = spec.plan
    model = build(TRANSFORMS, plan.transform, spec.method_params[plan.transform]).apply(model)
    context = {}
    if getattr(HOOKS.get(plan.hook), "needs_teachers", False):
        context["teachers"] = _load_teachers(data, spec, teachers or {})
    elif teachers:
        raise ValueError(f"hook {plan.hook!r} takes no teachers")
    hook = build(HOOKS, plan.hook, spec.method_params[plan.hook], **context)
    if spec.utilisation_probes and data.task.type == "segmentation":
        log.warning("utilisation probes predict one label per sample; skipped for the segmentation task %r",
                    data.task.name)
    elif spec.utilisation_probes:
        hook = with_utilisation(hook)
    return model, hook, backbone


def train_job(spec: RunSpec, store: Path, out_dir: Path, threads: int, init: Path | None = None,
              teachers: dict[str, Path] | None = None) -> dict[str, Any]:
    """Train (or fine-tune from ``init``) with the spec's transform and hook; evaluate valid and test
    (``teachers``: see :func:`prepare_training`)."""
    phases = Phases()
    _check_store(spec)
    reproducibility.configure(spec.seed, threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = RunData(store, spec)
    data.check("train", "valid", "test")
    train, valid = data.train_loader(), data.loader("valid")
    model, hook, backbone = prepare_training(spec, data, init, teachers)
    trainable, total = count_parameters(model)
    phases.lap("setup")
    with open_run(spec, threads) as run:
        phases.lap("tracking")
        cfg = spec.train
        result = fit(model, train, valid, hook, cfg,
                     log_epoch=lambda epoch, values: run.log_metrics(values, step=epoch),
                     checkpoint=out_dir / "last.ckpt", checkpoint_key=json.dumps(spec.to_dict(), sort_keys=True))
        model.load_state_dict(result.best_state)
        phases.lap("train")
        metrics = data.evaluate(model, cfg.torch_device)
        phases.lap("evaluate")
        summary = _summary(spec, data, metrics=metrics, oracle={s: data.oracle(s) for s in ("valid", "test") if data.oracle(s)},
                           ceiling={s: data.ceiling(s) for s in ("valid", "test") if data.ceiling(s)},
                           best_epoch=result.best_epoch, epochs_run=result.epochs_run,
                           target_labels_used=spec.tuned_on_target_labels,
                           trainable_params=trainable, total_params=total, backbone_params=backbone)
        if hook.run_summary():
            summary["hook"] = hook.run_summary()
        checkpoints.save(model, out_dir / "model.pt", spec)
        if spec.feature_stats:
            _save_feature_stats(model, data.loader("train"), out_dir / "feature_stats.pt", cfg.torch_device)
        _finish(run, out_dir, spec, summary, result.history, phases)
    (out_dir / "last.ckpt").unlink(missing_ok=True)
    return summary


def prepare_adapter(spec: RunSpec, data: RunData, model_path: Path,
                    source_stats: Path | None = None) -> tuple[torch.nn.Module, Any, str]:
    """The trained model, the spec's test-time adapter wrapped around it, and the device both live on."""
    if data.task.type == "segmentation":
        raise ValueError(f"test-time adaptation is not supported for segmentation (task {data.task.name!r})")
    model = _load_trained(data, spec, model_path)
    device = spec.train.torch_device
    model.to(device)
    name = spec.plan.adapter
    context: dict[str, Any] = {"model": model}
    if ADAPTERS.get(name).needs_source_stats:
        if source_stats is None or not Path(source_stats).is_file():
            raise ValueError(f"adapter {name!r} needs the source feature statistics the backbone job saves "
                             f"(feature_stats.pt); got {source_stats}")
        context["source_stats"] = source_stats
    return model, build(ADAPTERS, name, spec.method_params[name], **context), device


def target_validation(adapter: Any, data: RunData, device: str):
    """The callback that hands an adapter declaring label use (CASP's released code) the model's
    predictions on the target's validation split; None for every other adapter."""
    if not adapter.uses_target_labels:
        return None
    return lambda: model_predictions(adapter.model, data.loader("valid", target=True), device)


def adapted_predictions(adapter: Any, data: RunData, device: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``split``'s predictions through ``adapter``: an offline one first adapts on the unlabelled target
    train split (and, if it declares label use, picks checkpoints on the target's validation labels as
    its final runs do), an online one adapts as ``split`` streams by (what a search scores on validation)."""
    if adapter.offline:
        adapter.adapt(SplitPool(data.loader("train", target=True), device),
                      validate=target_validation(adapter, data, device))
    return predict(adapter.predict, data.loader(split), device)


def adapt_job(spec: RunSpec, store: Path, model_path: Path, out_dir: Path, threads: int,
              source_stats: Path | None = None) -> dict[str, Any]:
    """Adapt a trained model to the spec's target with the spec's test-time adapter; score the target test split.

    An offline adapter first adapts on the target's unlabelled train split; the target test error
    is recorded before and after each of its epochs. An online adapter adapts as the test stream
    passes; the error of each batch is recorded. Labels never reach the adapter, except the target
    validation callback of one that declares label use; ``target_labels_used`` is true then, and
    when the run's parameters come from a search scored on target labels (``tuned_on_target_labels``).
    """
    phases = Phases()
    _check_store(spec)
    reproducibility.configure(spec.seed, threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = RunData(store, spec)
    data.check("test")
    model, adapter, device = prepare_adapter(spec, data, model_path, source_stats)
    history: list[dict[str, float]] = []

    def error(pred: np.ndarray, y: np.ndarray) -> float:
        return float(np.abs(pred - y).mean()) if data.task.type == "regression" else float((pred.argmax(-1) != y).mean())

    phases.lap("setup")
    with open_run(spec, threads) as run:
        phases.lap("tracking")

        def note(unit: str, step: int, value: float, suffix: str = "") -> None:
            history.append({unit: step, f"target_error{suffix}": value})
            run.log_metrics({f"target_error{suffix}": value}, step=step)

        if adapter.offline:
            def on_epoch(epoch: int) -> None:
                note("epoch", epoch, error(*predict(adapter.predict, data.loader("test"), device)))

            on_epoch(0)
            adapter.adapt(SplitPool(data.loader("train", target=True), device), on_epoch=on_epoch,
                          validate=target_validation(adapter, data, device))
            pred, y = predict(adapter.predict, data.loader("test"), device)
        else:
            pred, y = predict(adapter.predict, data.loader("test"), device,
                              on_batch=lambda step, p, y: note("batch", step, error(p, y), "_per_batch"))
        phases.lap("adapt")
        trainable, total = count_parameters(model)
        summary = _summary(spec, data, metrics={"test": score(data.task, pred, y)},
                           oracle={"test": data.oracle("test")} if data.oracle("test") else {},
                           ceiling={"test": data.ceiling("test")} if data.ceiling("test") else {},
                           protocol="offline" if adapter.offline else "online",
                           target_labels_used=adapter.uses_target_labels or spec.tuned_on_target_labels,
                           trainable_params=trainable, total_params=total, backbone_params=total)
        _finish(run, out_dir, spec, summary, history, phases)
    return summary


def _finish(run: RunTracker | DeferredRun, out_dir: Path, spec: RunSpec, summary: dict[str, Any],
            history: list[dict[str, float]], phases: Phases) -> None:
    """Write the run's files, log the final metrics and the files, and record where the run went.

    ``metrics.json`` is written last among the files Snakemake waits for, after what it summarises.
    """
    write_json(out_dir / "config.json", spec.to_dict())
    write_json(out_dir / "history.json", history)
    write_json(out_dir / "metrics.json", summary)
    log_outcome(run, out_dir, summary)
    phases.lap("finish")
    write_json(out_dir / "timings.json", phases.summary())
    record(run, out_dir, tracking_uri(spec.results, spec.tracking.uri))
