"""``model.pt``: a trained model's weights and what rebuilds them, written by every training job and
read back, checked, by the jobs that start from one (fine-tuning, test-time adaptation, distillation).

A checkpoint records the model keys it was built with, its task and its model transform beside the
weights. A job that loads one compares them with what its run spec expects
(:class:`mmrepro.spec.CheckpointSpec`) before any compute: another study's model, another size or
another task is refused naming both, where it would otherwise be adapted into a wrong
``metrics.json``. An unreadable file (missing, truncated, not a checkpoint) is refused naming it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmrepro.data.schema import DataValidationError
from mmrepro.spec import CheckpointSpec, ModelSpec, RunSpec

log = logging.getLogger(__name__)

#: Tensors that are specific to a dataset (input widths, outputs): a backbone pretrained on another
#: dataset (``pretrain_dataset``) leaves them freshly initialised where their shapes differ.
DATASET_SPECIFIC = ("encoders.", "head.out.")


@dataclass(frozen=True)
class Checkpoint:
    """A ``model.pt`` as read: its weights and, when recorded, its model keys, task and transform
    (``{"name", "params"}``)."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    model: dict[str, Any] | None = None
    task: str | None = None
    transform: dict[str, Any] | None = None


def save(model: torch.nn.Module, path: Path, spec: RunSpec) -> None:
    """The weights with what rebuilds their module tree: the model keys, the task and the transform applied."""
    tmp = path.with_suffix(".tmp")
    transform = spec.plan.transform
    torch.save({"state_dict": model.state_dict(), "model": dataclasses.asdict(spec.model), "task": spec.task,
                "transform": {"name": transform, "params": spec.method_params[transform]}}, tmp)
    os.replace(tmp, path)


def read(path: Path) -> Checkpoint:
    """The checkpoint at ``path``; a missing or unreadable file raises naming it."""
    try:
        saved = torch.load(path, map_location="cpu")
    except FileNotFoundError:
        raise DataValidationError("checkpoint file is missing", file=str(path)) from None
    except IsADirectoryError:
        raise DataValidationError("checkpoint is a folder, not a model.pt file", file=str(path)) from None
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise DataValidationError(f"not a model checkpoint: unreadable ({type(e).__name__}: "
                                  f"{' '.join(str(e).split())[:200]}); pass the model.pt a training job wrote",
                                  file=str(path)) from None
    if not isinstance(saved, dict) or not isinstance(saved.get("state_dict"), dict):
        raise DataValidationError("not a model checkpoint: it holds no 'state_dict' (pass the model.pt a "
                                  "training job wrote)", file=str(path))
    return Checkpoint(Path(path), saved["state_dict"], saved.get("model"), saved.get("task"), saved.get("transform"))


def check(ckpt: Checkpoint, expected: CheckpointSpec | ModelSpec, role: str) -> None:
    """Refuse a checkpoint whose recorded architecture, task or transform differs from ``expected``
    (a :class:`ModelSpec` alone: the architecture only), naming each difference and both sides.
    ``role`` says what the job loads it as (``"the model to adapt"``)."""
    model = expected.model if isinstance(expected, CheckpointSpec) else expected
    differ = []
    if ckpt.model is not None:
        ours = model.architecture()
        differ += [f"{k} {ckpt.model[k]!r} (expected {v!r})" for k, v in ours.items()
                   if k in ckpt.model and ckpt.model[k] != v]
    if isinstance(expected, CheckpointSpec):
        if ckpt.task is not None and ckpt.task != expected.task:
            differ.append(f"task {ckpt.task!r} (expected {expected.task!r})")
        name = (ckpt.transform or {}).get("name")
        if name is not None and name != expected.transform:
            differ.append(f"model transform {name!r} (expected {expected.transform!r})")
    if differ:
        raise DataValidationError(f"not {role} of this run: the checkpoint has {', '.join(differ)}; the run spec "
                                  f"expects backbone {model.backbone!r}, d_model {model.d_model}. Pass the model.pt "
                                  "of the run the spec names", file=str(ckpt.path))


def load_weights(model: torch.nn.Module, ckpt: Checkpoint, fresh: tuple[str, ...] = DATASET_SPECIFIC) -> None:
    """Load a checkpoint's weights into ``model``; an ill-fitting checkpoint names the file.

    Tensors whose names start with one of ``fresh`` (by default the dataset-specific ones,
    :data:`DATASET_SPECIFIC`) and whose shapes differ start fresh."""
    own = model.state_dict()
    differ = [k for k, v in ckpt.state_dict.items() if k in own and own[k].shape != v.shape]
    restart = [k for k in differ if fresh and k.startswith(fresh)]
    if len(restart) < len(differ):
        raise DataValidationError(f"checkpoint does not fit the model (shapes differ: {sorted(set(differ) - set(restart))})",
                                  file=str(ckpt.path))
    if restart:
        log.info("%s: %s start fresh (shapes differ from the pretraining dataset's)", ckpt.path, restart)
    missing, unexpected = model.load_state_dict({k: v for k, v in ckpt.state_dict.items() if k not in restart},
                                                strict=False)
    missing = [k for k in missing if k not in restart]
    if unexpected or missing:
        raise DataValidationError(f"checkpoint does not fit the model (missing {missing}, unexpected {unexpected})",
                                  file=str(ckpt.path))
