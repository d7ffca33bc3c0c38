"""QMF: quality-aware multimodal fusion (Zhang et al., "Provable Dynamic Fusion for Low-Quality
Multimodal Data", ICML 2023), as a training hook on the ``late_qmf`` model.

What the official code does (``QingyangZhang/QMF``: ``src/models/late_fusion.py``,
``text-image-classification/train_qmf.py``; read, not copied). A late-fusion classifier: each
modality's classifier gives logits ``o_m``; its confidence is ``logsumexp(o_m) / 10`` (negative
energy over a temperature) and the fused logits are ``sum_m o_m * conf_m.detach()``. The loss is
the cross-entropy of the fused logits plus every unimodal cross-entropy plus, per modality, a
ranking loss that calibrates the confidence against the sample's history: each training sample's
unimodal cross-entropy is *added* to a per-sample running total after every step (the code calls
it "correctness"; it is a cumulative loss), totals are normalised to ``[0, 1]`` by
``(c - min c) / (max_correctness - min c)`` (``max_correctness`` starts at 1 and grows by one per
epoch from the second), and for each sample paired with the next one in the batch (``roll(-1)``)
the loss ``max(0, t * (conf_1 - conf_2 - |c_1 - c_2| / t))``, ``t = sign(c_1 - c_2)`` (0 pairs give
nothing), asks the sample with the larger historical loss to have the lower confidence, by at
least the normalised difference. The history is updated before the ranking loss is taken.

Here: ``late_qmf`` builds the late-fusion model (see ``late.py``; for regression a second output
unit per head is the confidence and the weights are its softmax over modalities); this hook adds
the unimodal task losses and ``rank_weight`` times the ranking losses (1 in the code) to the fused
task loss, with the same history rule. The history is indexed by ``Batch.index`` (row in the
training split) and grows to the largest index seen; unseen rows count as 0, as the code's
zero-initialised array of the split's length. Logged per epoch: ``qmf_rank`` (mean ranking loss)
and ``qmf_conf_<m>`` (mean confidence).
"""

from __future__ import annotations

import torch
from torch import nn

from mmrepro.data.loader import Batch
from mmrepro.methods.balance.common import EpochMeans, per_modality
from mmrepro.methods.hooks import TrainingHook
from mmrepro.methods.params import NonNegative
from mmrepro.methods.registry import HOOKS
from mmrepro.models.multimodal import ModelOutput


def ranking_loss(conf: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    """QMF's confidence ranking loss for one modality: confidences ``(B,)`` against the batch's
    normalised historical losses ``(B,)`` (:func:`normalise_history`), each sample paired with the next."""
    c1, c2 = history, torch.roll(history, -1)
    target = torch.sign(c1 - c2)
    margin = (c1 - c2).abs()
    nonzero = torch.where(target == 0, torch.ones_like(target), target)
    return torch.relu(target * (conf - (torch.roll(conf, -1) + margin / nonzero))).mean()


def normalise_history(values: torch.Tensor, lowest: float, max_correctness: float) -> torch.Tensor:
    """``(c - min) / (max_correctness - min)``, the code's normalisation (with a 1e-8 guard)."""
    return (values - lowest) / (max_correctness - lowest + 1e-8)


@HOOKS.register("qmf")
class QMF(TrainingHook):
    """Fused + unimodal task losses + confidence ranking against each sample's loss history."""

    transform = "late_qmf"

    def __init__(self, rank_weight: NonNegative = 1.0):
        self.rank_weight = float(rank_weight)
        self.history: dict[str, torch.Tensor] = {}
        self.max_correctness = 1.0
        self._means = EpochMeans()

    def setup(self, model: nn.Module, loss_fn, optimizer: torch.optim.Optimizer) -> None:
        self.loss_fn = loss_fn
        self.history = {m: torch.zeros(0) for m in model.names}
        self.max_correctness = 1.0
        self._means = EpochMeans()

    def _update(self, m: str, index: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        hist = self.history[m]
        need = int(index.max()) + 1
        if need > hist.numel():
            hist = torch.cat([hist, torch.zeros(need - hist.numel())])
        hist.index_add_(0, index.cpu(), losses.detach().float().cpu())
        self.history[m] = hist
        return normalise_history(hist[index.cpu()], float(hist.min()), self.max_correctness)

    def loss(self, model: nn.Module, batch: Batch, out: ModelOutput, task_loss: torch.Tensor) -> torch.Tensor:
        preds, confs = model.unimodal(out.features)
        total, rank = task_loss, 0.0
        for m in model.names:
            per_sample = self.loss_fn(preds[m], batch.y, reduction="none")
            total = total + per_sample.mean()
            hist = self._update(m, batch.index, per_sample).to(confs[m].device, confs[m].dtype)
            rank = rank + ranking_loss(confs[m], hist)
        self._means.add({"qmf_rank": float(rank.detach()),
                         **per_modality("qmf_conf", {m: float(c.detach().mean()) for m, c in confs.items()})})
        return total + self.rank_weight * rank

    def on_epoch_end(self, epoch: int, model: nn.Module, valid) -> dict[str, float]:
        if epoch > 1:
            self.max_correctness += 1.0
        return self._means.pop()

    def state_dict(self) -> dict:
        return {"history": dict(self.history), "max_correctness": self.max_correctness,
                "means": self._means.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.history = dict(state["history"])
        self.max_correctness = float(state["max_correctness"])
        self._means.load_state_dict(state["means"])
