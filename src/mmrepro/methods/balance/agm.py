"""AGM: adaptive gradient modulation (Li et al., ICCV 2023, "Boosting multi-modal model
performance with adaptive gradient modulation").

What the original does (read from the authors' code as mirrored in ``Lingy12/AGM_ICCV2023``:
``run/MOSEI_main.py``, ``utils/config.py``, and, from copies of the same code base found by the
code search, the MOSEI ``GradMod`` model wrapper and ``run/CREMAD_main.py``):

- **Shapley-style unimodal outputs.** Besides the normal forward ``v(all)``, the network is run
  with each modality's input replaced by zeros and with all of them zeroed (these passes in eval
  mode, i.e. without dropout, but *with* gradient). For two modalities the output attributed to
  modality ``a`` is ``0.5 * (v(all) - v(all but a) + v(only a))``: its Shapley value plus half of
  the all-zero output, so the two attributed outputs sum to ``v(all)``. The model's prediction
  is that sum.
- **Scores.** ``s_m`` = batch mean of ``-log softmax(out_m)[y]`` (probabilities under 1e-8 count
  as 1e-8): a loss, lower means modality ``m`` explains the label better.
- **Ratios.** ``r_m = exp(s_other - s_m)`` (the MOSEI script writes it ``exp(2 * (mean - s_m))``,
  the same for two modalities); the "optimal" ratio ``eta_m`` is the same expression on the
  running means ``s_hat`` of the scores, averaged over *all* iterations since training started
  (``s_hat <- s_hat * (t - 1)/t + s/t``, updated after the coefficients are computed).
- **Coefficients.** ``coeff_m = exp(alpha * min(eta_m - r_m, 10))`` (the cap is in the CREMA-D
  script; the MOSEI script has none). A modality doing better than its historical balance
  (``r_m > eta_m``) is damped, one doing worse is boosted.
- **Where they act.** Identity modules with a backward hook sit on each attributed output: the
  gradient reaching ``out_m`` is multiplied by ``coeff_m`` before it flows into everything that
  produced ``out_m`` (encoders, fusion and head alike, through all the zeroed passes). They are
  set only for epochs in ``[modulation_starts, modulation_ends]``. Defaults: alpha 1.0, epochs 0
  to 20 (1-based epochs there).

What we adapted:

- **Any number of modalities.** ``v(S)`` is our model's prediction with the modalities outside
  ``S`` zeroed (``dataclasses.replace`` on the batch's features; lengths and ``present`` are kept,
  as the original keeps its masks). ``phi_m`` is the exact Shapley value over all subsets for up
  to ``max_exact_modalities`` (4) modalities, ``2^M - 1`` extra forwards; above that, a Monte
  Carlo average over ``permutations`` random orders (every order's marginal contributions still
  sum to ``v(all) - v(none)``). The attributed output is ``out_m = phi_m + v(none) / M``; they sum
  to ``v(all)``, and for M = 2 this is exactly the original's formula.
- **Ratios for M > 2:** ``r_m = exp(mean_{k != m} s_k - s_m)``, i.e. ``exp(M/(M-1) (mean - s_m))``
  (for M = 2, the original). The same for ``eta_m`` on the running means.
- **Regression:** ``s_m`` is the batch mean of ``|out_m - y|`` (our regression task loss, L1), in
  place of the negative log-likelihood of the true class; lower is still better.
- **Mechanism.** ``loss`` returns the task loss of ``sum_m scale(out_m, coeff_m)``, where ``scale``
  is the identity forward and multiplies the gradient by ``coeff_m`` backward (the original's
  hooked identity modules). ``v(all)`` is the loop's own forward (train mode). Outside the window
  the coefficients would all be 1, and the prediction's gradient is then exactly the plain
  one; so there the zeroed passes run without gradient (only for the scores and running means,
  which the original also keeps updating) and the plain task loss is returned. The original
  keeps the last coefficients it set after the window ends (its hooks are simply not updated
  again); we go back to 1.
- The shared loop's gradient clipping replaces the original's conditional clipping.
- Epochs are counted through ``on_epoch_end`` from 1; the count, the iteration number and the
  running means are the hook's state (``state_dict``), kept in the loop's resumable checkpoint.

``on_epoch_end`` logs the epoch's mean applied coefficient (``coeff_<m>``, 1 outside the window),
the mean ratio ``r_m`` (``ratio_<m>``) and the running mean score ``s_hat_m`` (``contrib_<m>``:
the loss of modality ``m``'s Shapley output, lower = it carries more of the prediction).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from itertools import combinations

import torch
from torch import nn

from mmrepro.data.loader import Batch
from mmrepro.methods.balance.common import EpochMeans, eval_mode, keep_only, per_modality
from mmrepro.methods.hooks import TrainingHook
from mmrepro.methods.params import Count, NonNegative, Positive, PositiveInt
from mmrepro.methods.registry import HOOKS
from mmrepro.models.gradients import scale_grad
from mmrepro.models.multimodal import ModelOutput

LOG_FLOOR = math.log(1e-8)


def shapley_values(value: Callable[[frozenset], torch.Tensor], names: Sequence[str], *,
                   max_exact: int = 4, permutations: int = 8,
                   generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Shapley value of each player for the (tensor-valued) game ``value(frozenset_of_players)``.

    Exact over all subsets for up to ``max_exact`` players; beyond, the mean marginal
    contribution over ``permutations`` random orders (drawn with torch's RNG).
    """
    names = list(names)
    n = len(names)
    if n <= max_exact:
        phi = {}
        for m in names:
            others = [k for k in names if k != m]
            total = None
            for r in range(n):
                w = math.factorial(r) * math.factorial(n - r - 1) / math.factorial(n)
                for subset in combinations(others, r):
                    s = frozenset(subset)
                    term = w * (value(s | {m}) - value(s))
                    total = term if total is None else total + term
            phi[m] = total
        return phi
    sums: dict[str, torch.Tensor | None] = {m: None for m in names}
    for _ in range(permutations):
        order = torch.randperm(n, generator=generator).tolist()
        prefix: frozenset = frozenset()
        for i in order:
            m = names[i]
            term = value(prefix | {m}) - value(prefix)
            sums[m] = term if sums[m] is None else sums[m] + term
            prefix = prefix | {m}
    return {m: s / permutations for m, s in sums.items()}


def contribution_outputs(model: nn.Module, batch: Batch, full: torch.Tensor, *, max_exact: int = 4,
                         permutations: int = 8) -> dict[str, torch.Tensor]:
    """``out_m = phi_m + v(none) / M`` for each modality; they sum to ``full`` (= ``v(all)``).

    ``v(S)`` for ``S`` short of all modalities is a forward in eval mode with the other
    modalities' features zeroed; gradient flows through it when grad mode is on.
    """
    names = list(model.names)
    everything = frozenset(names)
    cache: dict[frozenset, torch.Tensor] = {everything: full}

    def value(s: frozenset) -> torch.Tensor:
        if s not in cache:
            cache[s] = model(keep_only(batch, s)).pred
        return cache[s]

    with eval_mode(model):
        phi = shapley_values(value, names, max_exact=max_exact, permutations=permutations)
        empty = value(frozenset())
    return {m: phi[m] + empty / len(names) for m in names}


def modality_score(out_m: torch.Tensor, y: torch.Tensor, task_type: str) -> float:
    """Batch mean of ``-log p(true class)`` (p floored at 1e-8), or of ``|out_m - y|`` for regression."""
    out_m = out_m.detach()
    if task_type == "regression":
        return float((out_m - y).abs().mean())
    logp = out_m.log_softmax(-1).gather(1, y.long()[:, None]).squeeze(1)
    return float(-logp.clamp_min(LOG_FLOOR).mean())


def _others_minus_own(scores: Mapping[str, float]) -> dict[str, float]:
    n = len(scores)
    total = sum(scores.values())
    return {m: (total - s) / (n - 1) - s for m, s in scores.items()}


def agm_coefficients(scores: Mapping[str, float], running: Mapping[str, float], alpha: float,
                     max_exponent: float = 10.0) -> tuple[dict[str, float], dict[str, float]]:
    """Ratios ``r_m = exp(mean_{k!=m} s_k - s_m)``, ``eta_m`` likewise on the running means, and
    coefficients ``exp(alpha * min(eta_m - r_m, max_exponent))``."""
    if len(scores) < 2:
        return {m: 1.0 for m in scores}, {m: 1.0 for m in scores}
    ratios = {m: math.exp(d) for m, d in _others_minus_own(scores).items()}
    optimal = {m: math.exp(d) for m, d in _others_minus_own(running).items()}
    coeffs = {m: math.exp(alpha * min(optimal[m] - ratios[m], max_exponent)) for m in scores}
    return ratios, coeffs


@HOOKS.register("agm")
class AGM(TrainingHook):
    """Scale the gradient of each modality's Shapley output toward its historical balance."""

    def __init__(self, alpha: NonNegative = 1.0, modulation_starts: Count = 0, modulation_ends: Count = 20,
                 max_exponent: Positive = 10.0, max_exact_modalities: PositiveInt = 4, permutations: PositiveInt = 8):
        self.alpha, self.max_exponent = float(alpha), float(max_exponent)
        self.modulation_starts, self.modulation_ends = int(modulation_starts), int(modulation_ends)
        self.max_exact_modalities, self.permutations = int(max_exact_modalities), int(permutations)
        self.loss_fn = None
        self.epoch = 1
        self.iteration = 0
        self.running: dict[str, float] = {}
        self.last_scores: dict[str, float] = {}
        self.last_ratios: dict[str, float] = {}
        self.last_coeffs: dict[str, float] = {}
        self._means = EpochMeans()

    def setup(self, model: nn.Module, loss_fn, optimizer: torch.optim.Optimizer) -> None:
        self.loss_fn = loss_fn
        self.epoch = 1
        self.iteration = 0
        self.running = {m: 0.0 for m in model.names}
        self._means = EpochMeans()

    @property
    def active(self) -> bool:
        return self.modulation_starts <= self.epoch <= self.modulation_ends

    def loss(self, model: nn.Module, batch: Batch, out: ModelOutput, task_loss: torch.Tensor) -> torch.Tensor:
        names = list(model.names)
        if len(names) < 2:
            return task_loss
        if self.loss_fn is None:
            raise RuntimeError("AGM.setup(model, loss_fn, optimizer) must run before the first step")
        active = self.active
        with torch.set_grad_enabled(active and torch.is_grad_enabled()):
            contribs = contribution_outputs(model, batch, out.pred, max_exact=self.max_exact_modalities,
                                            permutations=self.permutations)
        scores = {m: modality_score(contribs[m], batch.y, model.task_type) for m in names}
        for m in names:
            self.running.setdefault(m, 0.0)
        ratios, coeffs = agm_coefficients(scores, self.running, self.alpha, self.max_exponent)
        self.iteration += 1
        t = self.iteration
        self.running = {m: self.running[m] * (t - 1) / t + scores[m] / t for m in names}
        applied = coeffs if active else {m: 1.0 for m in names}
        self.last_scores, self.last_ratios, self.last_coeffs = scores, ratios, applied
        self._means.add({**per_modality("coeff", applied), **per_modality("ratio", ratios)})
        if not active:
            return task_loss
        pred = sum(scale_grad(contribs[m], applied[m]) for m in names)
        return self.loss_fn(pred, batch.y)

    def on_epoch_end(self, epoch: int, model: nn.Module, valid) -> dict[str, float]:
        values = self._means.pop()
        if values:
            values.update(per_modality("contrib", self.running))
        self.epoch = epoch + 1
        return values

    def state_dict(self) -> dict:
        """Epoch counter, iteration count, running mean scores, the last step's values and the epoch's
        running means (Monte Carlo orders come from torch's global generator, kept by the loop)."""
        return {"epoch": self.epoch, "iteration": self.iteration, "running": dict(self.running),
                "last_scores": dict(self.last_scores), "last_ratios": dict(self.last_ratios),
                "last_coeffs": dict(self.last_coeffs), "means": self._means.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.iteration = int(state["epoch"]), int(state["iteration"])
        self.running = dict(state["running"])
        self.last_scores, self.last_ratios = dict(state["last_scores"]), dict(state["last_ratios"])
        self.last_coeffs = dict(state["last_coeffs"])
        self._means.load_state_dict(state["means"])
