"""Late-fusion ensembles of unimodal heads: the model shape UME, QMF and ReconBoost train.

Those three baselines do not fuse features: every modality has its own predictor (encoder plus
classifier) and the prediction combines the predictors' outputs. The transforms here turn our
backbone into that shape: the fusion and the shared head are removed, each encoder's pooled
tokens (masked mean) feed one linear head of that modality, and ``pred`` combines the heads'
outputs. How it combines is the only difference between the three transforms:

- ``late_mean`` (UME, Du et al. 2023): the mean of the unimodal outputs (logits or values).
- ``late_boost`` (ReconBoost, Hua et al. 2024): the sum of the unimodal logits, as the official
  ``DynamicNet`` sums its learners (boost rate 1, its random constant ``c0`` left out); for
  regression the mean, since every learner is trained towards the label itself.
- ``late_qmf`` (QMF, Zhang et al. 2023): each modality's logits weighted per sample by its
  confidence, ``logsumexp(logits) / T`` (the negative energy over a temperature, T = 10 in the
  official ``late_fusion.py``), the confidence detached in the weighting, the weighted logits
  summed. Regression has no energy: there each head has a second output unit whose value is the
  confidence, and the weights are the softmax of the (detached) confidences over modalities, so
  the prediction stays a weighted mean of the unimodal values (our adaptation).

The hooks that train these models (``ume``, ``qmf``, ``reconboost``) name their transform, so the
method string is just the hook's name. ``ModelOutput.fused`` is the concatenation of the pooled
per-modality features (there is no fused layer).
"""

from __future__ import annotations

import torch
from torch import nn

from mmrepro.data.loader import Batch
from mmrepro.methods.registry import TRANSFORMS
from mmrepro.methods.transforms import ModelTransform
from mmrepro.models.encoders import masked_mean
from mmrepro.models.multimodal import ModelOutput, MultimodalModel

COMBINES = ("mean", "boost", "qmf")


class LateHeadsModel(MultimodalModel):
    """A ``MultimodalModel`` whose fusion and head are replaced by one linear head per modality."""

    combine_mode: str = "mean"
    temperature: float = 10.0

    def unimodal(self, features: dict[str, torch.Tensor],
                 names: list[str] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Per-modality predictions (shaped as ``pred``) and, for ``qmf``, confidences ``(B,)``."""
        preds, confs = {}, {}
        for m in names or self.names:
            raw = self.uni_heads[m](features[m])
            if self.task_type == "regression":
                preds[m] = raw[:, 0]
                if self.combine_mode == "qmf":
                    confs[m] = raw[:, 1]
            else:
                preds[m] = raw
                if self.combine_mode == "qmf":
                    confs[m] = torch.logsumexp(raw, dim=-1) / self.temperature
        return preds, confs

    def combine(self, preds: dict[str, torch.Tensor], confs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The ensemble's prediction from (some of) the unimodal predictions."""
        stacked = torch.stack(list(preds.values()))  # (M, B) or (M, B, K)
        if self.combine_mode == "mean" or (self.combine_mode == "boost" and self.task_type == "regression"):
            return stacked.mean(0)
        if self.combine_mode == "boost":
            return stacked.sum(0)
        w = torch.stack([confs[m] for m in preds]).detach()  # (M, B)
        if self.task_type == "regression":
            return (w.softmax(0) * stacked).sum(0)
        return (w.unsqueeze(-1) * stacked).sum(0)

    def forward(self, batch: Batch) -> ModelOutput:
        tokens, pads = self.encode(batch)
        features = {m: masked_mean(tokens[m], pads[m]) for m in self.names}
        preds, confs = self.unimodal(features)
        fused = torch.cat([features[m] for m in self.names], dim=-1)
        return ModelOutput(pred=self.combine(preds, confs), fused=fused, tokens=tokens, features=features)


class LateHeads(ModelTransform):
    """Replace fusion and head by per-modality linear heads combined by ``combine``."""

    needs_modality_layers = True

    combine = "mean"

    def apply(self, model: nn.Module) -> nn.Module:
        if type(model) is not MultimodalModel:
            raise TypeError(f"{self.name}: needs a MultimodalModel (sequence backbone), got {type(model).__name__}")
        out_dim = model.head.out.out_features
        units = out_dim + int(self.combine == "qmf" and model.task_type == "regression")
        ref = next(model.parameters())
        heads = nn.ModuleDict({m: nn.Linear(model.encoders[m].proj.out_channels, units) for m in model.names})
        del model.fusion, model.head
        model.__class__ = LateHeadsModel
        model.uni_heads = heads.to(ref.device, ref.dtype)
        model.combine_mode, model.out_dim = self.combine, out_dim
        return model


@TRANSFORMS.register("late_mean")
class LateMean(LateHeads):
    """Unimodal heads, prediction = their mean (UME's ensemble)."""

    combine = "mean"


@TRANSFORMS.register("late_boost")
class LateBoost(LateHeads):
    """Unimodal heads, prediction = sum of logits (mean for regression): ReconBoost's ensemble."""

    combine = "boost"


@TRANSFORMS.register("late_qmf")
class LateQMF(LateHeads):
    """Unimodal heads, prediction = confidence-weighted sum (QMF's dynamic late fusion)."""

    combine = "qmf"
