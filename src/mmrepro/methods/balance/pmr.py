"""PMR: prototypical modal rebalance (Fan et al., CVPR 2023), as a training hook.

What the original does
----------------------
Read from the authors' repository ``fanyunfeng-bit/Modal-Imbalance-PMR`` (``main_Prototype_grad.py``,
the only training script with the method) and, for the entropy term the authors' script leaves
out, from the re-implementation in ``GeWu-Lab/BalanceBenchmark`` (``balancemm/trainer/PMR_trainer.py``)
and the paper's abstract. In our own words:

* **Prototypes.** Before every epoch the model is put in eval mode and run (no gradient) over the
  first tenth of the training batches; the prototype of class ``k`` for modality ``m`` is the mean
  encoder feature of that modality over the samples of class ``k``. From the second epoch on the
  prototypes are an exponential moving average: ``P <- (1 - momentum) * mean + momentum * P_old``
  (``momentum_coef`` = 0.2 by default).
* **Prototypical classifier.** ``logits_m = -||z_m - P_m[k]||_2`` (plain Euclidean distance; the
  script declares a ``--temperature`` flag but never applies it). Its cross-entropy with the labels
  is the prototypical cross-entropy (PCE). Its mean softmax probability of the true class, summed
  over the batch, is each modality's score ``s_m``.
* **Rebalance coefficient.** With two modalities, ``rho = s_a / s_v``. The PCE of the weaker
  modality (the one with the lower score) is added to the task loss; the dominant one gets none.
  The authors' script uses a constant weight ``alpha`` for the weak modality whenever ``rho != 1``;
  BalanceBenchmark scales it by the size of the imbalance: ``alpha * clip(rho - 1, 0, 1)`` with
  ``rho`` = dominant score / weak score. (The paper's full text was not among the sources we could
  read, only its abstract, so which of the two the paper states is unconfirmed here.)
* **Entropy regulariser (PER).** During the first epochs only, the entropy of the *dominant*
  modality's prototypical distribution is subtracted from the loss, weighted by ``mu`` times the
  same imbalance coefficient: maximising it keeps the dominant modality from converging early and
  suppressing the weak one.
* Modulation (PCE) is active between ``modulation_starts`` and ``modulation_ends`` (100 of 150
  epochs in the script's defaults).

What we adapted
---------------
* **Features.** ``out.features[m]``, the pooled output of encoder ``m`` (the input of the fusion),
  plays the role of the original's per-modality encoder output, for both backbones.
* **Prototype update.** Hooks do not see the training loader, so instead of an extra eval-mode
  pass before each epoch we accumulate the (detached, train-mode) class sums of ``out.features``
  during the epoch and at its end set ``P <- (1 - momentum) * class_mean + momentum * P_old``
  (the original's EMA). During the first epoch, before any epoch has ended, the prototypes are the
  running class means of the batches seen so far (the current batch included), standing in for the
  original's pre-training pass. A class not seen yet has no prototype and is left out of the
  distance softmax (its samples are skipped) until it appears.
* **Regression.** Classes are the sign of the label: class 1 if ``y >= 0`` and class 0 otherwise
  (the "has-0" binarisation of the sentiment literature's Acc-2), so two prototypes per modality.
  Classification tasks use the head's number of classes.
* **More than two modalities.** The dominant modality ``d`` has the highest score; every other
  modality ``m`` gets ``c_m = clip(s_d / s_m - 1, 0, 1)`` (``coef="ratio"``) or
  ``c_m = 1 if s_m < s_d`` (``coef="binary"``, the authors' script), and the entropy term of ``d``
  is weighted by ``max_m c_m``. With two modalities this is exactly the original.
* **Coefficient.** ``coef="ratio"`` (default, BalanceBenchmark's form) or ``coef="binary"`` (the
  authors' script). A modality with score 0 gets ``c_m = 1`` (``0`` if the dominant score is 0 too).
* **Loss.** ``task + alpha * sum_{m != d} c_m * PCE_m - mu * max_m(c_m) * H_d`` where ``H_d`` is the
  batch-mean entropy of ``d``'s prototypical softmax (BalanceBenchmark sums it over the batch, i.e.
  its ``mu`` is our ``mu`` divided by the batch size). PCE is a batch mean. Scores and coefficients carry no
  gradient; PCE and entropy carry gradient into the encoders (prototypes are constants).
* **Temperature.** ``temperature`` divides the distances; the default 1.0 is the original.
* **Epochs** are 1-based (the shared loop's numbering): PCE is on for
  ``modulation_starts <= epoch <= modulation_ends`` (``None`` = to the end; our default runs are
  short, so the whole run), the entropy term for the first ``per_epochs`` epochs from
  ``modulation_starts``. The defaults ``mu = 0.01`` and ``per_epochs = 3`` are our choices (the
  authors' script has no entropy term to take them from).
* Hook state (prototypes, which classes have one, the epoch's class sums, epoch counter) is part
  of the loop's resumable checkpoint (``state_dict``): a resumed run continues the prototypes.

Logged per epoch: ``pmr_coef_<m>`` (mean over the epoch's steps of the PCE weight ``alpha * c_m``;
0 for the dominant modality), ``pmr_entropy_coef_<m>`` (mean weight ``mu * max c`` of ``m``'s
entropy term, nonzero only where ``m`` was dominant) and ``pmr_score_<m>`` (mean true-class
probability of ``m``'s prototypical classifier).
"""

from __future__ import annotations

from typing import Annotated

import torch
from torch import nn

from mmrepro.data.loader import Batch, SplitLoader
from mmrepro.methods.hooks import TrainingHook
from mmrepro.methods.params import Count, NonNegative, OneOf, Positive, PositiveInt, Rate
from mmrepro.methods.registry import HOOKS
from mmrepro.models.multimodal import ModelOutput

COEFS = ("ratio", "binary")


def sign_classes(y: torch.Tensor) -> torch.Tensor:
    """Regression labels as two classes: 1 where ``y >= 0``, else 0."""
    return (y >= 0).long()


def proto_logits(features: torch.Tensor, prototypes: torch.Tensor, temperature: float) -> torch.Tensor:
    """``-||z - P_k|| / temperature`` for every sample and prototype: ``(B, d), (K, d) -> (B, K)``."""
    return -torch.cdist(features, prototypes, p=2) / temperature


def rebalance_coefficients(scores: dict[str, float], coef: str = "ratio") -> tuple[str, dict[str, float]]:
    """The dominant modality (highest score) and each modality's imbalance coefficient ``c_m``.

    ``ratio``: ``c_m = clip(s_dom / s_m - 1, 0, 1)``; ``binary``: ``c_m = 1`` if ``s_m < s_dom``.
    The dominant modality's own coefficient is 0.
    """
    dominant = max(scores, key=lambda m: scores[m])
    top = scores[dominant]
    out = {}
    for m, s in scores.items():
        if m == dominant:
            out[m] = 0.0
        elif coef == "binary":
            out[m] = 1.0 if s < top else 0.0
        else:
            out[m] = min(max(top / s - 1.0, 0.0), 1.0) if s > 0 else (1.0 if top > 0 else 0.0)
    return dominant, out


@HOOKS.register("pmr")
class PrototypicalModalRebalance(TrainingHook):
    """Prototype cross-entropy for the weak modalities and an early entropy bonus for the dominant one."""

    def __init__(self, alpha: NonNegative = 1.0, mu: NonNegative = 0.01, temperature: Positive = 1.0,
                 momentum: Rate = 0.2, modulation_starts: Count = 1, modulation_ends: Count | None = None,
                 per_epochs: PositiveInt = 3, coef: Annotated[str, OneOf(COEFS)] = "ratio"):
        self.alpha, self.mu, self.temperature, self.momentum = alpha, mu, temperature, momentum
        self.modulation_starts, self.modulation_ends, self.per_epochs = modulation_starts, modulation_ends, per_epochs
        self.coef = coef
        self.epoch = 1
        self.names: list[str] = []
        self.num_classes = 0
        self.task_type = "regression"
        self.prototypes: dict[str, torch.Tensor] = {}  # (K, d), valid where self.seen
        self.seen: torch.Tensor | None = None  # (K,) bool: classes with a prototype from a finished epoch
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: torch.Tensor | None = None
        self._log: dict[str, list[float]] = {}

    # -- setup and class labels ------------------------------------------------------------------

    def setup(self, model: nn.Module, loss_fn, optimizer: torch.optim.Optimizer) -> None:
        self.names = list(model.names)
        self.task_type = model.task_type
        self.num_classes = 2 if model.task_type == "regression" else model.head.out.out_features
        self.epoch = 1
        self.prototypes, self.seen = {}, None
        self._device = next(model.parameters()).device
        self._reset_accumulators()

    def classes(self, y: torch.Tensor) -> torch.Tensor:
        return sign_classes(y) if self.task_type == "regression" else y.long()

    def _reset_accumulators(self) -> None:
        self._sums, self._counts = {}, None
        self._log = {}

    # -- prototypes --------------------------------------------------------------------------------

    @torch.no_grad()
    def accumulate(self, features: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        """Add a batch's detached features to the per-class sums of the current epoch."""
        onehot = nn.functional.one_hot(labels, self.num_classes).to(next(iter(features.values())).dtype)
        if self._counts is None:
            self._counts = torch.zeros(self.num_classes, device=labels.device)
        self._counts += onehot.sum(0)
        for m in self.names:
            s = onehot.T @ features[m].detach()
            self._sums[m] = self._sums[m] + s if m in self._sums else s

    def current_prototypes(self) -> tuple[dict[str, torch.Tensor], torch.Tensor] | None:
        """Prototypes in force now and which classes have one (``None`` when no class has one)."""
        if self.seen is not None:
            return self.prototypes, self.seen
        if self._counts is None or not bool((self._counts > 0).any()):
            return None
        seen = self._counts > 0
        denom = self._counts.clamp_min(1.0)[:, None]
        return {m: self._sums[m] / denom for m in self.names}, seen

    @torch.no_grad()
    def end_epoch_prototypes(self) -> None:
        """EMA of the epoch's class means into the prototypes: ``(1 - momentum) * mean + momentum * old``."""
        if self._counts is None:
            return
        new_seen = self._counts > 0
        denom = self._counts.clamp_min(1.0)[:, None]
        for m in self.names:
            mean = self._sums[m] / denom
            if self.seen is None:
                self.prototypes[m] = torch.where(new_seen[:, None], mean, torch.zeros_like(mean))
                continue
            both = (new_seen & self.seen)[:, None]
            old = self.prototypes[m]
            ema = (1.0 - self.momentum) * mean + self.momentum * old
            self.prototypes[m] = torch.where(both, ema, torch.where(new_seen[:, None], mean, old))
        self.seen = new_seen if self.seen is None else (new_seen | self.seen)

    # -- the loss ------------------------------------------------------------------------------------

    def pce_active(self) -> bool:
        ends = self.modulation_ends
        return self.epoch >= self.modulation_starts and (ends is None or self.epoch <= ends)

    def per_active(self) -> bool:
        return self.modulation_starts <= self.epoch < self.modulation_starts + self.per_epochs

    def terms(self, features: dict[str, torch.Tensor], labels: torch.Tensor, prototypes: dict[str, torch.Tensor],
              seen: torch.Tensor) -> dict[str, object]:
        """Scores, coefficients, PCE and entropy per modality, for given features and prototypes.

        Only classes in ``seen`` take part (columns of the softmax) and only samples of those classes.
        """
        keep = seen[labels]
        cols = torch.nonzero(seen).flatten()
        remap = torch.full((self.num_classes,), -1, dtype=torch.long, device=labels.device)
        remap[cols] = torch.arange(len(cols), device=labels.device)
        target = remap[labels[keep]]
        scores, pce, entropy = {}, {}, {}
        for m in self.names:
            logits = proto_logits(features[m][keep], prototypes[m][cols], self.temperature)
            logp = torch.log_softmax(logits, dim=-1)
            p = logp.exp()
            scores[m] = float(p.detach().gather(1, target[:, None]).sum())
            pce[m] = nn.functional.nll_loss(logp, target)
            entropy[m] = -(p * logp).sum(-1).mean()
        dominant, coefs = rebalance_coefficients(scores, self.coef)
        return {"scores": scores, "dominant": dominant, "coefs": coefs, "pce": pce, "entropy": entropy,
                "n": int(keep.sum())}

    def loss(self, model: nn.Module, batch: Batch, out: ModelOutput, task_loss: torch.Tensor) -> torch.Tensor:
        labels = self.classes(batch.y)
        if self.seen is None:  # first epoch: running means, the current batch included
            self.accumulate(out.features, labels)
            current = self.current_prototypes()
        else:
            current = self.current_prototypes()
            self.accumulate(out.features, labels)
        if current is None:
            return task_loss
        active_pce, active_per = self.pce_active(), self.per_active()
        with torch.set_grad_enabled(torch.is_grad_enabled() and (active_pce or active_per)):
            t = self.terms(out.features, labels, *current)
        if t["n"] == 0:
            return task_loss
        coefs, dominant = t["coefs"], t["dominant"]
        pce_w = {m: (self.alpha * coefs[m] if active_pce else 0.0) for m in self.names}
        ent_w = {m: 0.0 for m in self.names}
        if active_per:
            ent_w[dominant] = self.mu * max(coefs.values())
        loss = task_loss
        for m in self.names:
            if pce_w[m]:
                loss = loss + pce_w[m] * t["pce"][m]
            if ent_w[m]:
                loss = loss - ent_w[m] * t["entropy"][m]
            self._log.setdefault(f"pmr_coef_{m}", []).append(pce_w[m])
            self._log.setdefault(f"pmr_entropy_coef_{m}", []).append(ent_w[m])
            self._log.setdefault(f"pmr_score_{m}", []).append(t["scores"][m] / t["n"])
        return loss

    def on_epoch_end(self, epoch: int, model: nn.Module, valid: SplitLoader) -> dict[str, float]:
        values = {k: sum(v) / len(v) for k, v in self._log.items()}
        for m in self.names:  # every key on every epoch, so the logged series line up
            for key in (f"pmr_coef_{m}", f"pmr_entropy_coef_{m}", f"pmr_score_{m}"):
                values.setdefault(key, 0.0 if "coef" in key else float("nan"))
        self.end_epoch_prototypes()
        self._reset_accumulators()
        self.epoch = epoch + 1
        return values

    # -- resuming ------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Epoch counter, prototypes and their ``seen`` mask, the epoch's class sums and counts and its
        logged values (the last three are empty at the end of an epoch, when the loop saves)."""
        return {"epoch": self.epoch, "prototypes": dict(self.prototypes), "seen": self.seen,
                "sums": dict(self._sums), "counts": self._counts,
                "log": {k: list(v) for k, v in self._log.items()}}

    def load_state_dict(self, state: dict) -> None:
        device = getattr(self, "_device", None)

        def to(t):
            return t if t is None or device is None else t.to(device)

        self.epoch = int(state["epoch"])
        self.prototypes = {m: to(t) for m, t in state["prototypes"].items()}
        self.seen = to(state["seen"])
        self._sums = {m: to(t) for m, t in state["sums"].items()}
        self._counts = to(state["counts"])
        self._log = {k: list(v) for k, v in state["log"].items()}
