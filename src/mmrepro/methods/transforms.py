"""Model transforms: take a backbone, return the model to train with exactly the method's parameters trainable.

In the spirit of PEFT's tuners: each transform is a small class with its hyperparameters as
constructor arguments and one ``apply(model) -> model``. The trivial member, full fine-tuning,
trains every parameter.
"""

from __future__ import annotations

from torch import nn

from mmrepro.methods.registry import TRANSFORMS


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


class ModelTransform:
    name = "base"
    #: True when it adapts per-modality transformer encoders, so a backbone whose encoders only project
    #: (:data:`mmrepro.models.presets.JOINT_PRESETS`) cannot take it (checked with the config).
    needs_modality_layers = False
    #: Model config keys the transform needs set: ``{key: (value, why)}`` (MPLMM's zero prompts need
    #: ``position_padding: True``); the config check refuses a study whose model sets them otherwise.
    requires_model: dict[str, tuple[object, str]] = {}

    def apply(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError


@TRANSFORMS.register("full_finetune")
class FullFinetune(ModelTransform):
    """Every parameter of the backbone and head is trained (the upper reference of PEFT studies)."""

    def apply(self, model: nn.Module) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
