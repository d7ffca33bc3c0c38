"""Greedy: balanced multimodal learning with re-balancing steps (Wu et al., ICML 2022), as a training hook.

What the original does
----------------------
Read from the authors' repository ``nyukat/greedy_multimodal_learning`` (``src/callbacks.py``:
``Bias_Mitigation_Strong``; ``src/balanced_mmtm.py``; ``src/model.py``; ``src/framework.py``;
``configs/training_guided.gin``). In our own words:

* The model has one branch per modality (two ResNets) joined by MMTM blocks that let each branch
  rescale its features from both branches' pooled features ("cross-modal" parameters).
* **Learning speed.** After every backward pass (before the optimizer step), for each modality
  and each parameter set (its own branch, "main"; the MMTM parameters that feed it, "bypass"), the
  ratio ``sum ||grad||^2 / sum ||weight||^2`` (squared norms, summed over the set) is added to a
  running total that is never reset. The conditional learning speed of modality ``m`` is
  ``BDR_m = log10(total_bypass_m / total_main_m)``: how fast the parameters bringing the other
  modality in learn relative to ``m``'s own branch. The imbalance is ``d = BDR_0 - BDR_1``.
* **Re-balancing.** From the second epoch on (``starting_epoch = 2``), after a normal step with
  ``|d| > epsilon`` (0.01) the next ``curation_windowsize`` (5) steps are re-balancing steps for
  the modality with the larger ``BDR`` (the one leaning more on the other; ``d > 0`` -> modality 0).
  In those steps the MMTM scale applied to that modality is replaced by its running average, so
  that branch gets no live cross-modal information and must learn from its own input. Speeds are
  neither measured nor accumulated during re-balancing steps. (The running average kept for the
  second modality is computed from the first modality's scales in the code; a slip we note, not
  reproduce.)

What we adapted
---------------
Our backbones have no MMTM blocks, so a re-balancing step cannot cut a cross-modal input. As the
project's plan asks, a re-balancing step for modality ``k`` instead updates only ``k``'s encoder
among the encoders: in ``after_backward`` the gradients of every other encoder are dropped
(``grad = None``, so Adam skips those parameters entirely; a zero gradient would still move them
through Adam's momentum). Fusion and head train as usual.

Speeds, two ways (``speed``):

* ``encoder`` (default, any backbone): ``mu_m`` = running sum over normal steps of
  ``sum ||grad||^2 / sum ||weight||^2`` over ``model.encoders[m]``'s parameters (as the original
  accumulates its "main" ratio). The slower modality is ``argmin mu_m``; the imbalance is
  ``d = log10(max mu / min mu)``. This is a plain, not a conditional, learning speed.
* ``conditional`` (``mult`` backbone only): the original's conditional speed, with the
  crossmodal blocks ``fusion.cross["s->m"]`` (every source ``s != m``) as ``m``'s bypass and its
  encoder as its main branch: ``BDR_m = log10(bypass total / main total)``; re-balance the
  modality with the largest ``BDR``; ``d = max BDR - min BDR`` (for two modalities ``|BDR_0 - BDR_1|``,
  as the original).

Shared with the original: accumulation every step before ``start_epoch`` (1-based epochs), and
after it only on normal steps; a re-balancing window decided after a normal step covers the next
``window`` steps; defaults ``epsilon = 0.01``, ``window = 5``, ``start_epoch = 2``. Gradients are
measured before the loop's gradient clipping, as the original measures them before its step.

Logged per epoch: ``greedy_speed_<m>`` (``log10`` of the accumulated speed ``mu_m``, or ``BDR_m``
in conditional mode), ``greedy_imbalance`` (the latest ``d``), ``greedy_rebalance_<m>`` (fraction
of the epoch's steps that were re-balancing steps for ``m``) and ``greedy_rebalanced`` (index in
``model.names`` of the modality re-balanced most often this epoch, -1 if none).
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from torch import nn

from mmrepro.data.loader import Batch, SplitLoader
from mmrepro.methods.hooks import TrainingHook
from mmrepro.methods.params import Count, NonNegative, OneOf, PositiveInt
from mmrepro.methods.registry import HOOKS
from mmrepro.models.multimodal import ModelOutput

SPEEDS = ("encoder", "conditional")


def grad_weight_ratio(params) -> float | None:
    """``sum ||grad||^2 / sum ||weight||^2`` over the parameters that have a gradient (None if none do)."""
    gn = wn = 0.0
    any_grad = False
    for p in params:
        if p.grad is None:
            continue
        any_grad = True
        gn += float(p.grad.detach().pow(2).sum())
        wn += float(p.detach().pow(2).sum())
    if not any_grad or wn == 0.0:
        return None
    return gn / wn


@HOOKS.register("greedy")
class GreedyRebalancing(TrainingHook):
    """Measure each modality's learning speed; give the slower one re-balancing steps when they drift apart."""

    def __init__(self, epsilon: NonNegative = 0.01, window: PositiveInt = 5, start_epoch: Count = 2,
                 speed: Annotated[str, OneOf(SPEEDS)] = "encoder"):
        self.epsilon, self.window, self.start_epoch, self.speed = epsilon, window, start_epoch, speed
        self.names: list[str] = []
        self.epoch = 1
        self.main: dict[str, float] = {}
        self.bypass: dict[str, float] = {}
        self.caring: str | None = None  # modality of the re-balancing window in progress
        self.window_step = 0
        self.imbalance = 0.0
        self._steps = 0
        self._rebalance_steps: dict[str, int] = {}

    # -- parameter sets ----------------------------------------------------------------------------

    def setup(self, model: nn.Module, loss_fn, optimizer: torch.optim.Optimizer) -> None:
        self.names = list(model.names)
        if self.speed == "conditional" and not hasattr(model.fusion, "cross"):
            raise ValueError("greedy.speed='conditional' needs crossmodal fusion parameters (backbone 'mult'); "
                             "use speed='encoder' with this backbone")
        self.epoch = 1
        self.main = {m: 0.0 for m in self.names}
        self.bypass = {m: 0.0 for m in self.names}
        self.caring, self.window_step, self.imbalance = None, 0, 0.0
        self._steps, self._rebalance_steps = 0, {m: 0 for m in self.names}

    def main_params(self, model: nn.Module, m: str):
        return list(model.encoders[m].parameters())

    def bypass_params(self, model: nn.Module, m: str):
        return [p for s in self.names if s != m for p in model.fusion.cross[f"{s}->{m}"].parameters()]

    # -- speeds ------------------------------------------------------------------------------------------

    def accumulate(self, model: nn.Module) -> None:
        for m in self.names:
            r = grad_weight_ratio(self.main_params(model, m))
            if r is not None:
                self.main[m] += r
            if self.speed == "conditional":
                r = grad_weight_ratio(self.bypass_params(model, m))
                if r is not None:
                    self.bypass[m] += r

    def speeds(self) -> dict[str, float]:
        """``log10`` of each modality's accumulated speed (encoder) or its BDR (conditional); -inf if unknown."""
        out = {}
        for m in self.names:
            if self.speed == "conditional":
                ok = self.main[m] > 0 and self.bypass[m] > 0
                out[m] = math.log10(self.bypass[m] / self.main[m]) if ok else -math.inf
            else:
                out[m] = math.log10(self.main[m]) if self.main[m] > 0 else -math.inf
        return out

    def decide(self) -> tuple[float, str | None]:
        """The imbalance ``d`` and the modality a re-balancing window would care for."""
        s = self.speeds()
        if any(not math.isfinite(v) for v in s.values()) or len(s) < 2:
            return 0.0, None
        hi, lo = max(s, key=s.get), min(s, key=s.get)
        d = s[hi] - s[lo]  # encoder: log10(max mu / min mu); conditional: max BDR - min BDR
        return d, (lo if self.speed == "encoder" else hi)

    # -- the step ------------------------------------------------------------------------------------------

    def after_backward(self, model: nn.Module, batch: Batch, out: ModelOutput) -> None:
        self._steps += 1
        if self.caring is not None:  # a re-balancing step: only the caring modality's encoder learns
            for m in self.names:
                if m != self.caring:
                    for p in model.encoders[m].parameters():
                        p.grad = None
            self._rebalance_steps[self.caring] += 1
            self.window_step += 1
            if self.window_step >= self.window:
                self.caring, self.window_step = None, 0
            return
        self.accumulate(model)
        self.imbalance, slow = self.decide()
        if self.epoch >= self.start_epoch and slow is not None and abs(self.imbalance) > self.epsilon:
            self.caring, self.window_step = slow, 0

    def on_epoch_end(self, epoch: int, model: nn.Module, valid: SplitLoader) -> dict[str, float]:
        values = {f"greedy_speed_{m}": (v if math.isfinite(v) else math.nan) for m, v in self.speeds().items()}
        values["greedy_imbalance"] = self.imbalance
        steps = max(self._steps, 1)
        values.update({f"greedy_rebalance_{m}": self._rebalance_steps[m] / steps for m in self.names})
        most = max(self.names, key=lambda m: self._rebalance_steps[m])
        values["greedy_rebalanced"] = float(self.names.index(most)) if self._rebalance_steps[most] else -1.0
        self._steps, self._rebalance_steps = 0, {m: 0 for m in self.names}
        self.epoch = epoch + 1
        return values

    def state_dict(self) -> dict:
        """Epoch counter, accumulated speeds, the re-balancing window in progress, the latest
        imbalance and the epoch's step counts."""
        return {"epoch": self.epoch, "main": dict(self.main), "bypass": dict(self.bypass), "caring": self.caring,
                "window_step": self.window_step, "imbalance": self.imbalance, "steps": self._steps,
                "rebalance_steps": dict(self._rebalance_steps)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.main, self.bypass = dict(state["main"]), dict(state["bypass"])
        self.caring, self.window_step = state["caring"], int(state["window_step"])
        self.imbalance, self._steps = float(state["imbalance"]), int(state["steps"])
        self._rebalance_steps = dict(state["rebalance_steps"])

    def loss(self, model: nn.Module, batch: Batch, out: ModelOutput, task_loss: torch.Tensor) -> torch.Tensor:
        return task_loss
