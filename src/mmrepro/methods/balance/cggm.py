"""CGGM: classifier-guided gradient modulation (Guo et al., NeurIPS 2024) as a training hook.

What the official code does
---------------------------
Files read (GitHub ``zrguo/CGGM``): ``src/msatrain.py`` (MOSI / IEMOCAP), ``src/foodtrain.py``
(Food-101), ``src/segtrain.py`` (BraTS), ``models/msamodel.py`` (backbone, classifiers,
``cal_coeff``), ``models/foodmodel.py``, ``models/segmodel.py``, ``modules/transformer.py``,
``src/eval_metrics.py`` (``cal_cos``, ``train_eval_*``) and ``run/{mosi,iemo,food,brats}_run.py``.

The model returns its prediction and every modality's encoder output as a detached copy. Next to
the model lives one classifier per modality (a ``cls_layers``-layer transformer over the detached
encoder output, first time step, a hidden linear layer applied twice, ReLU, ``out_layer``) with
its own optimizer (the run script's optimizer at ``cls_lr``). Two pieces of state carry over from
step to step, also across epochs: the classifiers' accuracies of the previous batch (zeros at the
start) and the direction loss ``l_gm`` (absent at the first step). One training step:

1. forward; task loss; if ``l_gm`` exists, add ``lambda * l_gm``; backward.
2. zero the classifiers' grads; run them on the detached encoder outputs; backward the sum over
   modalities of their task losses (this reaches only classifier parameters).
3. ``cos_i``: cosine similarity between the flattened ``out_layer.weight`` of classifier ``i`` and
   the flattened ``out_layer.weight`` of the fused model (``cal_cos``; the code calls both
   "grad" but uses the parameter values, each through ``clone()``, so the cosine stays
   differentiable with respect to both weights as they were at this step).
4. ``acc_i``: classifier ``i``'s accuracy on this batch, from the logits of step 2 (MOSI: sign
   agreement ``pred > 0`` vs ``y > 0``, zeros counted as negative; IEMOCAP / Food: argmax;
   BraTS: mean of three Dice scores). ``d_i = acc_i - acc_i(previous batch)``,
   ``S = sum_i d_i + 1e-8``, ``coeff_i = (S - d_i) / S`` (no clipping, no other guard; a
   coefficient can be negative or huge). The previous accuracies become this batch's.
5. ``l_gm = (sum_i |coeff_i| - sum_i coeff_i * cos_i) / M``, a tensor (MOSI hard-codes three
   terms, Food two, BraTS four). Its graph reaches the fused ``out_layer.weight`` and the
   classifiers' ``out_layer.weight``; at the next step's step 1 it adds a gradient to the fused
   ``out_layer.weight`` only (the classifiers' part is wiped by step 2's zeroing).
6. multiply the gradient of every parameter of encoder ``i`` by ``coeff_i * rho``. The Conv1d
   input projections are separate modules (``proj``), so they are not scaled; neither are the
   fusion transformer and the head.
7. classifier optimizer step; clip the model's gradient norm to ``clip``; model optimizer step.

There is no CGGM warm-up (BraTS's ``warmup_epochs`` is a learning-rate warm-up of its cosine
schedule); the classifiers are never put in eval mode and never evaluated; the scripts report
the best validation accuracy over epochs. Quirks met in the code (not reproduced, listed for the
study): Food's ``FoodModel`` projects the text with the image's Conv1d (``projv`` twice,
``projt`` unused); BraTS's magnitude step looks for ``vision_encoder`` / ``text_encoder``
parameters, which its DeepLab model does not have, so on BraTS only the direction term acts;
BraTS never clips gradients although ``--clip`` exists; the scripts crash without CUDA.

Our implementation
------------------
The same order, with the shared loop's hook points: ``loss`` adds ``lam * l_gm`` from the
previous step (step 1), ``after_backward`` does steps 2 to 6 (``UnimodalProbes.step`` does step 2
and the classifier optimizer step of step 7; the cosine uses the probes' ``out`` weights as they
were *before* that update, as the official code), and the loop clips and steps. Every parameter
of ``model.encoders[m]`` except ``proj`` (``pos``, ``transformer``, ``norm``) is scaled; the
proj, the fusion and the head are not. ``on_epoch_end`` logs ``util_<m>`` (probe accuracy on the
validation split, probes and model in eval mode), ``coeff_<m>`` (mean coefficient over the
epoch's steps), ``probe_train_acc_<m>`` (mean batch accuracy) and ``l_gm`` (epoch mean).

Where we differ, and why:

- **Shapes of the compared out layers.** In the official MSA and Food models the fusion is a
  transformer over the time-concatenated modality sequences whose first step has width
  ``proj_dim``, so the fused ``out_layer`` and every classifier's ``out_layer`` are both
  ``(out_dim, proj_dim)`` and the cosine compares whole matrices (the same fused matrix for every
  modality; in BraTS both are ``(4, 256, 1, 1)``). Our head's ``out`` reads the fused vector of
  width ``F``; both our backbones build it as the concatenation, in modality order, of one
  ``d``-wide block per modality (``fusion.py``; the head's residual MLP keeps block ``i`` on the
  identity path). So ``cos_i`` compares probe ``i``'s ``out`` weight with the columns of
  ``head.out.weight`` that read modality ``i``'s block (same ``(out_dim, d)`` shape). When
  ``F == d`` the whole matrix is used, as the official code. Any other width raises.
- **Any number of modalities** M (the official code hard-codes its 2, 3 or 4 terms).
- ``direction="weights"`` (default) is the code's version. ``direction="gradients"`` is the
  paper's reading (cosines between gradients): after each step we keep probe ``i``'s gradient of
  its ``out`` weight and the coefficients; at the next step ``loss`` takes the gradient of the
  task loss with respect to ``head.out.weight`` with ``create_graph=True`` (its block ``i``),
  forms ``l_gm`` from the cosines with the kept probe gradients, and adds ``lam * l_gm``. That
  term is differentiable through the fused gradient, so it reaches the head and, through the
  features and the prediction, the rest of the model (a second-order term, not only
  ``head.out.weight``).
- ``guarded=True``: the denominator ``S`` is replaced by ``sign(S) * max(|S|, guard_eps)``
  (``sign(0) = +1``, default ``guard_eps = 0.05``). Batch accuracies move in steps of
  ``1 / batch``, so ``S`` is either about 1e-8 (coefficients up to ~1e7: only clipping bounds the
  step) or at least ``1 / batch`` in size; the clamp keeps the coefficients continuous in ``d``
  and bounded by ``1 + sum|d| / guard_eps``. Default off (faithful).
- The probes mask padded time steps (our sequences have lengths), use one dropout rate and see
  our encoders' tokens; see :mod:`mmrepro.methods.balance.probes`.
- Optimizer / scheduler: the shared loop uses Adam with a fixed learning rate and early stopping
  on validation loss (the official MOSI/IEMOCAP scripts use ReduceLROnPlateau on validation loss
  with patience ``when``, Food uses AdamW with weight decay, BraTS SGD with a cosine schedule).
  ``cls_optim`` / ``cls_weight_decay`` set the probes' optimizer (Food: ``AdamW``, 3e-3).
- The hook's state (probes, previous accuracies, ``l_gm``) is not part of the loop's resumable
  checkpoint: a resumed run restarts the probes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmrepro.data.loader import Batch, SplitLoader
from mmrepro.methods.balance.probes import UnimodalProbes
from mmrepro.methods.hooks import TrainingHook
from mmrepro.methods.registry import HOOKS
from mmrepro.models.multimodal import ModelOutput

DIRECTIONS = ("weights", "gradients")


def modulation_coefficients(d: list[float], guarded: bool = False, guard_eps: float = 0.05) -> list[float]:
    """``coeff_i = (S - d_i) / S`` with ``S = sum(d) + 1e-8``: the share of the improvement made by
    the other modalities. ``guarded`` clamps ``|S|`` to at least ``guard_eps`` (sign kept, 0 -> +)."""
    s = sum(d) + 1e-8
    if guarded:
        s = max(abs(s), guard_eps) * (1.0 if s >= 0 else -1.0)
    return [(s - di) / s for di in d]


def direction_loss(coeffs: list[float], cos: list[torch.Tensor]) -> torch.Tensor:
    """``l_gm = (sum_i |coeff_i| - sum_i coeff_i * cos_i) / M`` (a tensor carrying ``cos``'s graph)."""
    m = len(coeffs)
    aligned = sum(c * k for c, k in zip(coeffs, cos))
    return (sum(abs(c) for c in coeffs) - aligned) / m


def head_blocks(model: nn.Module, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The columns of a head-``out``-shaped ``(out_dim, F)`` tensor that read each modality's block.

    ``F == d``: the whole tensor for every modality (the official code's case);
    ``F == M * d``: block ``i`` of the concatenated fused vector, in the fusion's modality order.
    """
    names = list(getattr(model.fusion, "names", model.names))
    d = model.encoders[names[0]].proj.out_channels
    width = weight.shape[1]
    if width == d:
        return {m: weight for m in names}
    if width == d * len(names):
        return {m: weight[:, i * d:(i + 1) * d] for i, m in enumerate(names)}
    raise ValueError(f"cggm: the head's out layer reads {width} features; expected d={d} or "
                     f"M*d={d * len(names)} (one d-wide block per modality)")


@HOOKS.register("cggm")
class CGGM(TrainingHook):
    """Classifier-guided gradient modulation (see the module docstring for the method and the code).

    Defaults are the official MOSI run script's (``run/mosi_run.py``).
    """

    tracks_utilisation = True

    def __init__(self, rho: float = 1.3, lam: float = 0.2, cls_lr: float = 5e-4, cls_layers: int = 2,
                 cls_heads: int | None = None, cls_dropout: float = 0.15, cls_optim: str = "Adam",
                 cls_weight_decay: float = 0.0, faithful_double_hidden: bool = True,
                 direction: str = "weights", guarded: bool = False, guard_eps: float = 0.05):
        if direction not in DIRECTIONS:
            raise ValueError(f"cggm: direction must be one of {DIRECTIONS}, got {direction!r}")
        if guard_eps <= 0:
            raise ValueError("cggm: guard_eps must be positive")
        self.rho, self.lam = rho, lam
        self.probe_kw = dict(layers=cls_layers, heads=cls_heads, dropout=cls_dropout, lr=cls_lr,
                             optim=cls_optim, weight_decay=cls_weight_decay,
                             faithful_double_hidden=faithful_double_hidden)
        self.direction, self.guarded, self.guard_eps = direction, guarded, guard_eps
        self.probes: UnimodalProbes | None = None

    # ---------------------------------------------------------------------------------------------
    def setup(self, model: nn.Module, loss_fn, optimizer: torch.optim.Optimizer) -> None:
        if len(model.names) < 2:
            raise ValueError("cggm needs at least two modalities (with one, coeff = 1e-8 / (d + 1e-8))")
        self.names = list(model.names)
        self.loss_fn = loss_fn
        self.probes = UnimodalProbes.for_model(model, **self.probe_kw)
        head_blocks(model, model.head.out.weight)  # fail early on an unsupported head width
        self.prev_acc = {m: 0.0 for m in self.names}
        self.l_gm: torch.Tensor | None = None  # weights mode: built at step t, used at step t+1
        self.probe_grads: dict[str, torch.Tensor] | None = None  # gradients mode
        self.last_acc: dict[str, float] = {}
        self.last_coeffs: dict[str, float] = {}
        self.last_l_gm: float | None = None
        self._reset_epoch()

    def _reset_epoch(self) -> None:
        self._sum_coeff = {m: 0.0 for m in self.names}
        self._sum_acc = {m: 0.0 for m in self.names}
        self._sum_l_gm, self._n_l_gm, self._steps = 0.0, 0, 0

    # ---------------------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: Batch, out: ModelOutput, task_loss: torch.Tensor) -> torch.Tensor:
        if self.direction == "weights":
            l_gm, self.l_gm = self.l_gm, None  # each direction term is used by exactly one step
        else:
            l_gm = self._gradient_direction_loss(model, task_loss)
            if l_gm is not None:
                self._record_l_gm(l_gm)
        if l_gm is None:
            return task_loss
        return task_loss + self.lam * l_gm

    def _gradient_direction_loss(self, model: nn.Module, task_loss: torch.Tensor) -> torch.Tensor | None:
        """The paper's reading: cosines between the fused out-layer gradient (this step, differentiable)
        and each probe's out-layer gradient (previous step), weighted by the previous coefficients."""
        if self.probe_grads is None or not task_loss.requires_grad:
            return None
        fused_grad, = torch.autograd.grad(task_loss, model.head.out.weight, create_graph=True, retain_graph=True)
        blocks = head_blocks(model, fused_grad)
        cos = [F.cosine_similarity(self.probe_grads[m].flatten(), blocks[m].flatten(), dim=0) for m in self.names]
        return direction_loss([self.last_coeffs[m] for m in self.names], cos)

    def after_backward(self, model: nn.Module, batch: Batch, out: ModelOutput) -> None:
        # probe out weights before the probes' update (the official cosine uses pre-update values)
        probe_w = {m: self.probes.out_weight(m).detach().clone() for m in self.names}
        acc = self.probes.step(out, batch, self.loss_fn)
        d = [acc[m] - self.prev_acc[m] for m in self.names]
        coeffs = dict(zip(self.names, modulation_coefficients(d, self.guarded, self.guard_eps)))
        self.prev_acc = acc
        self.last_acc, self.last_coeffs = acc, coeffs

        if self.direction == "weights":
            # clone: the optimizer updates the weight in place before this term is back-propagated
            blocks = head_blocks(model, model.head.out.weight)
            cos = [F.cosine_similarity(probe_w[m].flatten(), blocks[m].clone().flatten(), dim=0)
                   for m in self.names]
            self.l_gm = direction_loss([coeffs[m] for m in self.names], cos)
            self._record_l_gm(self.l_gm)
        else:
            self.probe_grads = {m: self.probes.out_weight(m).grad.detach().clone() for m in self.names}

        for m in self.names:
            scale = coeffs[m] * self.rho
            for name, p in model.encoders[m].named_parameters():
                if name.startswith("proj.") or p.grad is None:
                    continue
                p.grad.mul_(scale)

        self._steps += 1
        for m in self.names:
            self._sum_coeff[m] += coeffs[m]
            self._sum_acc[m] += acc[m]

    def _record_l_gm(self, l_gm: torch.Tensor) -> None:
        self.last_l_gm = float(l_gm.detach())
        self._sum_l_gm += self.last_l_gm
        self._n_l_gm += 1

    # ---------------------------------------------------------------------------------------------
    def on_epoch_end(self, epoch: int, model: nn.Module, valid: SplitLoader) -> dict[str, float]:
        util = self.probes.evaluate(model, valid)
        n = self._steps
        values = {f"util_{m}": util[m] for m in self.names}
        values.update({f"coeff_{m}": self._sum_coeff[m] / n if n else float("nan") for m in self.names})
        values.update({f"probe_train_acc_{m}": self._sum_acc[m] / n if n else float("nan") for m in self.names})
        values["l_gm"] = self._sum_l_gm / self._n_l_gm if self._n_l_gm else float("nan")
        self._reset_epoch()
        return values
