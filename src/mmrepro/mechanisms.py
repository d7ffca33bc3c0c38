"""Diagnostics that say whether a study's phenomenon is present on a synth setting.

Each study's setting on ``synth`` has a dose knob (a generator or data-setting parameter) and one
diagnostic, a number compared with a threshold fixed here *before* any measurement, so that a
table read "on synth" means "on a setting where the paper's effect is there":

``balance`` (dose: ``synth.shortcut_private``)
    per weak modality, what its encoder learned alone minus what it learned under joint training,
    both after the same number of epochs, read by :func:`encoder_probe` (a ridge readout of the
    encoder's pooled features fitted on train, scored on valid: corr, or accuracy for classes;
    closed form, so the reading does not depend on how fast a trained probe learns). Present when
    every weak modality's gap is at least :data:`IMBALANCE_GAP`. Measured at the default
    :class:`Budget` (seed 0, loaded CPU): dose 1.0 audio 0.066, vision 0.070; dose 0 audio
    -0.053, vision 0.013 (joint training helps the weak encoders when the shortcut lacks their
    private latents).
``peft`` (dose: ``synth.interaction_transfer``, setting ``synth_transfer``)
    full fine-tuning's score minus a linear probe's on the same frozen pretrained backbone,
    relative to full fine-tuning. Present when at least :data:`TRANSFER_GAP`. The downstream label
    puts the dose's share in a product of a text and an audio latent that the pretraining task
    ignores (:mod:`mmrepro.data.synth`): a linear head on frozen features cannot form it, full
    fine-tuning of a late-fusion model can. Measured at the default :class:`Budget` with 800
    training samples (seeds 0 / 1, loaded CPU): dose 0.5 0.353 / 0.305, dose 0.25 0.123 (seed 1),
    dose 0 0.005 / -0.005.
``missing`` (dose: the missing rate) and ``shift`` (dose: a target domain's ``scale``)
    the relative increase of a model's error (MAE; 1 - accuracy for classes) over the
    complete / source data. Present when at least :data:`DEGRADATION`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmrepro import metrics, reproducibility
from mmrepro.data import build_store
from mmrepro.evaluate import evaluate_model, metric_kind, predict
from mmrepro.evaluate import score as score_predictions
from mmrepro.jobs import RunData
from mmrepro.methods.registry import ADAPTERS, HOOKS, TRANSFORMS, build
from mmrepro.methods.transforms import count_parameters
from mmrepro.report.tables import LOWER_IS_BETTER, MAIN_METRIC
from mmrepro.models.build import build_model
from mmrepro.spec import DataSetting
from mmrepro.train import TrainConfig, fit

#: Smallest encoder-probe gap (unimodal - joint; corr or accuracy) of every weak modality for imbalance to count.
IMBALANCE_GAP = 0.05
#: Smallest relative gap (full fine-tuning - linear probe) / full fine-tuning for transfer to count.
TRANSFER_GAP = 0.10
#: Smallest relative error increase under missing modalities or a shifted domain.
DEGRADATION = 0.10


@dataclass(frozen=True)
class Diagnostic:
    """One diagnostic value of a study at one dose, with the threshold it is read against."""

    study: str
    dose: float
    value: float
    threshold: float
    detail: str = ""

    @property
    def present(self) -> bool:
        return self.value >= self.threshold


def imbalance(dose: float, unimodal: Mapping[str, float], joint: Mapping[str, float]) -> Diagnostic:
    """Weak modalities' probe accuracies alone (``unimodal``) and under joint training (``joint``);
    the value is the smallest gap over the modalities of ``unimodal``."""
    gaps = {m: unimodal[m] - joint[m] for m in unimodal}
    worst = min(gaps, key=gaps.get)
    return Diagnostic("balance", dose, gaps[worst], IMBALANCE_GAP,
                      ", ".join(f"{m}: {unimodal[m]:.3f} alone, {joint[m]:.3f} joint" for m in gaps))


def transfer(dose: float, linear_probe: float, full_finetune: float) -> Diagnostic:
    """Scores (higher is better, e.g. corr) of a linear probe and of full fine-tuning."""
    return Diagnostic("peft", dose, (full_finetune - linear_probe) / abs(full_finetune), TRANSFER_GAP,
                      f"linear probe {linear_probe:.3f}, full fine-tuning {full_finetune:.3f}")


def degradation(study: str, dose: float, reference_error: float, error: float) -> Diagnostic:
    """Errors (lower is better) on the reference data and at ``dose``."""
    return Diagnostic(study, dose, (error - reference_error) / reference_error, DEGRADATION,
                      f"error {reference_error:.3f} -> {error:.3f}")


@torch.no_grad()
def _features(model: torch.nn.Module, loader, modality: str) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    feats, ys = [], []
    for batch in loader:
        feats.append(model(batch).features[modality].double().numpy())
        ys.append(batch.y.numpy())
    return np.concatenate(feats), np.concatenate(ys)


def encoder_probe(model: torch.nn.Module, train, valid, modality: str, ridge: float = 1e-2) -> float:
    """How much of the label ``modality``'s encoder carries: a ridge readout of its pooled features,
    fitted on ``train`` and scored on ``valid`` (corr for regression, accuracy for classes)."""
    x, y = _features(model, train, modality)
    xv, yv = _features(model, valid, modality)
    mean, std = x.mean(0), x.std(0) + 1e-8
    x, xv = np.c_[np.ones(len(x)), (x - mean) / std], np.c_[np.ones(len(xv)), (xv - mean) / std]
    classes = model.task_type != "regression"
    target = np.eye(int(max(y.max(), yv.max())) + 1)[y] if classes else y
    coef = np.linalg.solve(x.T @ x + ridge * len(x) * np.eye(x.shape[1]), x.T @ target)
    pred = xv @ coef
    if classes:
        return float((pred.argmax(1) == yv).mean())
    return metrics.regression_metrics(pred, yv)["corr"]


# --------------------------------------------------------------------------- measuring on a budget


@dataclass(frozen=True)
class Budget:
    """The small training budget a diagnostic is measured with (every run of it alike)."""

    epochs: int = 6
    batch_size: int = 32
    lr: float = 3e-3
    d_model: int = 16
    heads: int = 2
    backbone: str = "late"


def train(store: Path, task: str, budget: Budget, seed: int, *, setting: DataSetting | None = None,
          init: dict[str, torch.Tensor] | None = None, transform: str = "full_finetune", hook: str = "joint",
          params: Mapping[str, dict[str, Any]] | None = None) -> tuple[torch.nn.Module, RunData]:
    """Train ``budget.epochs`` epochs (no early stop, so runs compare at equal epochs); return the last model."""
    reproducibility.configure(seed, 1)
    params = params or {}
    data = RunData.for_diagnostic(store, task, setting or DataSetting("complete", {}), budget.batch_size, seed)
    model = build_model(data.schema, data.task, modalities=data.modalities, backbone=budget.backbone,
                        d_model=budget.d_model, layers=1, heads=budget.heads, kernel=3, dropout=0.0, fusion_layers=1)
    if init is not None:
        model.load_state_dict(init)
    model = build(TRANSFORMS, transform, params.get(transform)).apply(model)
    fit(model, data.loader("train", shuffle=True), data.loader("valid"), build(HOOKS, hook, params.get(hook)),
        TrainConfig(epochs=budget.epochs, batch_size=budget.batch_size, lr=budget.lr, patience=budget.epochs + 1,
                    device="cpu"))
    return model, data


def score(model: torch.nn.Module, data: RunData, split: str = "test") -> dict[str, float]:
    return evaluate_model(model, data.loader(split), data.task)


def measure_imbalance(store: Path, task: str, budget: Budget, seed: int, dose: float) -> Diagnostic:
    """Joint training and one unimodal run per weak modality, read by :func:`encoder_probe`."""
    joint, data = train(store, task, budget, seed)
    weak = data.schema.modality_names[1:]
    together = {m: encoder_probe(joint, data.loader("train"), data.loader("valid"), m) for m in weak}
    alone = {}
    for m in weak:
        model, single = train(store, task, budget, seed, setting=DataSetting("subset", {"modalities": [m]}))
        alone[m] = encoder_probe(model, single.loader("train"), single.loader("valid"), m)
    return imbalance(dose, alone, together)


@dataclass(frozen=True)
class TransferRuns:
    """A pretrained backbone's weights and the two reference adaptations of it (test scores and
    trainable parameters, keyed ``linear_probe`` and ``full_finetune``)."""

    init: dict[str, torch.Tensor]
    data: RunData
    linear_probe: dict[str, float]
    full_finetune: dict[str, float]
    trainable: dict[str, int]


def transfer_runs(store: Path, budget: Budget, seed: int, task: str = "main",
                  pretrain_task: str = "pretrain") -> TransferRuns:
    """Pretrain a backbone on ``pretrain_task``, then a linear probe and full fine-tuning from it on ``task``."""
    backbone, _ = train(store, pretrain_task, budget, seed)
    init = {k: v.clone() for k, v in backbone.state_dict().items()}
    probe, data = train(store, task, budget, seed, init=init, transform="linear_probe")
    full, _ = train(store, task, budget, seed, init=init)
    return TransferRuns(init, data, score(probe, data), score(full, data),
                        {"linear_probe": count_parameters(probe)[0], "full_finetune": count_parameters(full)[0]})


def measure_transfer(store: Path, budget: Budget, seed: int, dose: float, task: str = "main",
                     pretrain_task: str = "pretrain") -> Diagnostic:
    """The transfer diagnostic from :func:`transfer_runs` (test corr of both adaptations)."""
    runs = transfer_runs(store, budget, seed, task, pretrain_task)
    return transfer(dose, runs.linear_probe["corr"], runs.full_finetune["corr"])


# --------------------------------------------------------------------------- one point of a sweep

#: The dose each study's sweep varies: a synth key, the missing rate, or the target domain's scale.
DOSE_KEYS = {"balance": "shortcut_private", "peft": "interaction_transfer", "missing": "rate", "shift": "scale"}


def _dosed(study: str, entry: dict[str, Any], dose: float, domain: str | None) -> dict[str, Any]:
    """The dataset entry with ``dose`` applied (missing applies it at load time instead)."""
    entry = copy.deepcopy(entry)
    synth = entry["synth"]
    if study in ("balance", "peft"):
        synth[DOSE_KEYS[study]] = dose
    synth["domains"] = {domain: {**synth["domains"][domain], "scale": dose}} if study == "shift" else {}
    return entry


def _better(scores: dict[str, float], base: dict[str, float], metric: str) -> float:
    """How much better ``scores`` is than ``base`` on ``metric`` (positive = better)."""
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    return sign * (scores[metric] - base[metric])


def run_point(study: str, entry: dict[str, Any], dose: float, seed: int, budget: Budget, workdir: Path, *,
              methods: list[str] = (), params: Mapping[str, dict[str, Any]] | None = None,
              domain: str | None = None) -> dict[str, Any]:
    """One (study, dose, seed) point: the diagnostic, the baseline's score and each method's gain over it.

    Gains are in the task's main metric (positive = better): balance hooks over joint training,
    PEFT transforms as the share of the (full fine-tuning - linear probe) gap they close (``None``
    where the diagnostic says there is no gap to close: a share of noise), missing methods over joint
    training at the same rate, test-time adapters over the source model. PEFT points also record each
    method's trainable parameters.
    """
    store = build_store("mechanism", _dosed(study, entry, dose, domain), Path(workdir) / "store")
    task = entry["task"]
    gains: dict[str, float | None] = {}
    trainable: dict[str, int] = {}
    if study == "balance":
        diag = measure_imbalance(store, task, budget, seed, dose)
        joint, data = train(store, task, budget, seed)
        base = score(joint, data)
        metric = MAIN_METRIC[metric_kind(data.task)]
        for m in methods:
            gains[m] = _better(score(train(store, task, budget, seed, hook=m, params=params)[0], data), base, metric)
    elif study == "peft":
        runs = transfer_runs(store, budget, seed, task, entry["pretrain_task"])
        base, full = runs.linear_probe, runs.full_finetune
        diag = transfer(dose, base["corr"], full["corr"])
        metric = "corr"
        trainable.update(runs.trainable)
        for m in methods:
            model, data = train(store, task, budget, seed, init=runs.init, transform=m, params=params)
            trainable[m] = count_parameters(model)[0]
            closed = score(model, data)["corr"]
            gains[m] = (closed - base["corr"]) / (full["corr"] - base["corr"]) if diag.present else None
    elif study == "missing":
        complete = score(*train(store, task, budget, seed))
        setting = DataSetting("zero_fill", {"rate": dose})
        joint, data = train(store, task, budget, seed, setting=setting)
        base = score(joint, data)
        metric = MAIN_METRIC[metric_kind(data.task)]
        diag = degradation(study, dose, *(_error(s, metric) for s in (complete, base)))
        for m in methods:
            gains[m] = _better(score(train(store, task, budget, seed, setting=setting, transform=m,
                                           params=params)[0], data), base, metric)
    elif study == "shift":
        model, data = train(store, task, budget, seed)
        source = score(model, data)
        target = RunData.for_diagnostic(store, task, DataSetting("domain", {"domain": domain}), budget.batch_size, seed)
        base = score(model, target)
        metric = MAIN_METRIC[metric_kind(data.task)]
        diag = degradation(study, dose, *(_error(s, metric) for s in (source, base)))
        for m in methods:
            adapter = build(ADAPTERS, m, (params or {}).get(m), model=copy.deepcopy(model))
            pred, y = predict(adapter.predict, target.loader("test"))
            gains[m] = _better(score_predictions(target.task, pred, y), base, metric)
    else:
        raise ValueError(f"unknown study {study!r}; one of {sorted(DOSE_KEYS)}")
    return {"study": study, "dose": dose, "seed": seed, "metric": metric, "baseline": base[metric],
            "diagnostic": {"value": diag.value, "threshold": diag.threshold, "present": diag.present,
                           "detail": diag.detail},
            "gains": gains, "trainable": trainable}


def _error(scores: dict[str, float], metric: str) -> float:
    """An error to compare relatively: the metric itself if lower is better, else 1 - it."""
    return scores[metric] if metric in LOWER_IS_BETTER else 1.0 - scores[metric]
