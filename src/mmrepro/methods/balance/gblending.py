"""G-Blending: gradient blending by overfitting-to-generalisation ratios (Wang, Tran, Feiszli,
"What Makes Training Multi-Modal Classification Networks Hard?", CVPR 2020), as a training hook.

What the paper does (no official code was found in the stored index; from the paper and
``../shared/specs/cggm.md``). Besides the fused head, every modality gets a head on its own
features; the network trains on a weighted sum of all heads' losses. The weights come from each
head's overfitting-to-generalisation behaviour measured on a held-out part V of the training set:
between two checkpoints N and N + n, the generalisation gain ``dG = L^V_N - L^V_{N+n}`` and the
change of the overfitting gap ``O = L^V - L^T``, ``dO = O_{N+n} - O_N``; the weight of a head is
proportional to ``dG / dO^2`` (the paper's closed form of the optimal blend under its
assumptions), normalised to sum 1. "Online" G-Blend re-estimates the weights every few epochs
("super-epochs") during one training run; that is what this hook does.

Here:
- V is every ``holdout_every``-th training sample by its row (``Batch.index % holdout_every == 0``,
  10 % by default): those samples are forwarded with the batch but give no gradient (their losses
  are only recorded). ``L^T`` and ``L^V`` of a head are the means of its per-sample losses over the
  epoch's training and held-out samples (measured during training, in train mode, instead of a
  separate evaluation pass at the checkpoint).
- Unimodal heads: one linear layer per modality on the encoder's pooled tokens
  (``ModelOutput.features``), owned by the hook with its own Adam (``lr``). Their losses flow into
  the encoders (that is the point); the fused head is the model's own, used alone at test time.
- Weights start uniform over the M + 1 heads; a snapshot of ``(L^T, L^V)`` is taken after epoch 1
  and then every ``every`` epochs, and at each snapshot after the first the weights are re-estimated
  from the change since the previous one. A negative ``dG`` (the head got worse on V) gives weight
  0; if every head has weight 0 the previous weights stay.

Logged per epoch: ``gb_w_fused`` and ``gb_w_<m>`` (the weights used in the next epoch) and
``gb_holdout_<head>`` (``L^V``).
"""

from __future__ import annotations

from typing import Annotated

import torch
from torch import nn

from mmrepro.data.loader import Batch
from mmrepro.methods.hooks import TrainingHook
from mmrepro.methods.params import NonNegative, PositiveInt, Range
from mmrepro.methods.registry import HOOKS
from mmrepro.models.multimodal import ModelOutput

FUSED = "fused"


def blend_weights(prev: dict[str, tuple[float, float]], now: dict[str, tuple[float, float]],
                  eps: float = 1e-12) -> dict[str, float] | None:
    """G-Blend weights from two snapshots ``{head: (L^T, L^V)}``: ``max(dG, 0) / dO^2``, normalised;
    None when every head's gain is zero or negative."""
    raw = {}
    for k, (lt, lv) in now.items():
        lt0, lv0 = prev[k]
        gain = lv0 - lv
        d_over = (lv - lt) - (lv0 - lt0)
        raw[k] = max(gain, 0.0) / (d_over ** 2 + eps)
    total = sum(raw.values())
    return {k: v / total for k, v in raw.items()} if total > 0 else None


@HOOKS.register("gblending")
class GBlending(TrainingHook):
    """Weighted sum of the fused and unimodal heads' losses, weights from OGR on a held-out part of train."""

    def __init__(self, every: PositiveInt = 2, holdout_every: Annotated[int, Range(2)] = 10, lr: NonNegative = 1e-3):
        self.every, self.holdout_every, self.lr = int(every), int(holdout_every), float(lr)

    def setup(self, model: nn.Module, loss_fn, optimizer: torch.optim.Optimizer) -> None:
        self.loss_fn = loss_fn
        ref = next(model.parameters())
        out_dim = model.head.out.out_features
        self.heads = nn.ModuleDict({m: nn.Linear(model.encoders[m].proj.out_channels, out_dim)
                                    for m in model.names}).to(ref.device, ref.dtype)
        self.optimizer = torch.optim.Adam(self.heads.parameters(), lr=self.lr)
        keys = [FUSED, *model.names]
        self.weights = {k: 1.0 / len(keys) for k in keys}
        self.snapshot: dict[str, list[float]] | None = None
        self._sums = {k: [0.0, 0.0, 0.0, 0.0] for k in keys}  # train sum, train n, held sum, held n

    def head_losses(self, model: nn.Module, batch: Batch, out: ModelOutput) -> dict[str, torch.Tensor]:
        """Per-sample losses ``(B,)`` of the fused head and of every unimodal head."""
        losses = {FUSED: self.loss_fn(out.pred, batch.y, reduction="none")}
        for m in model.names:
            pred = self.heads[m](out.features[m])
            losses[m] = self.loss_fn(pred.squeeze(-1) if model.task_type == "regression" else pred, batch.y,
                                     reduction="none")
        return losses

    def loss(self, model: nn.Module, batch: Batch, out: ModelOutput, task_loss: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        held = (batch.index % self.holdout_every == 0).to(out.pred.device)
        train = (~held).to(out.pred.dtype)
        total = out.pred.new_zeros(())
        for k, per in self.head_losses(model, batch, out).items():
            total = total + self.weights[k] * (per * train).sum() / train.sum().clamp(min=1.0)
            d = per.detach()
            s = self._sums[k]
            s[0] += float(d[~held].sum()); s[1] += float((~held).sum())
            s[2] += float(d[held].sum()); s[3] += float(held.sum())
        return total

    def after_backward(self, model: nn.Module, batch: Batch, out: ModelOutput) -> None:
        self.optimizer.step()

    def on_epoch_end(self, epoch: int, model: nn.Module, valid) -> dict[str, float]:
        now = {k: (s[0] / max(s[1], 1.0), s[2] / max(s[3], 1.0)) for k, s in self._sums.items()}
        self._sums = {k: [0.0, 0.0, 0.0, 0.0] for k in self._sums}
        if (epoch - 1) % self.every == 0:
            if self.snapshot is not None:
                new = blend_weights({k: tuple(v) for k, v in self.snapshot.items()}, now)
                if new is not None:
                    self.weights = new
            self.snapshot = {k: list(v) for k, v in now.items()}
        return {**{f"gb_w_{k}": w for k, w in self.weights.items()},
                **{f"gb_holdout_{k}": lv for k, (_, lv) in now.items()}}

    def state_dict(self) -> dict:
        return {"heads": self.heads.state_dict(), "optimizer": self.optimizer.state_dict(),
                "weights": dict(self.weights), "snapshot": self.snapshot, "sums": {k: list(v) for k, v in self._sums.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.heads.load_state_dict(state["heads"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.weights, self.snapshot = dict(state["weights"]), state["snapshot"]
        self._sums = {k: list(v) for k, v in state["sums"].items()}
