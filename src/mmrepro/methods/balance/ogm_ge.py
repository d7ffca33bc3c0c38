"""OGM-GE: on-the-fly gradient modulation with generalisation enhancement (Peng et al., CVPR 2022).

What the original does (read from ``GeWu-Lab/OGM-GE_CVPR2022``: ``main.py`` and its README; the
same recipe is re-implemented in the AGM authors' ``run/CREMAD_main.py``). The audio-visual model
fuses two encoders by concatenation into one linear layer ``fc_out``. Every step, after the
backward pass of the fused loss, it splits that layer by input block to get one output per
modality, ``out_u = W[:, block_u] h_u + b / 2``, and sums over the batch each modality's softmax
probability of the true class (``score_u``). The discrepancy ratio is ``rho_v = score_v / score_a``
(``rho_a = 1 / rho_v``). The modality whose ratio exceeds 1 is dominant; its coefficient is
``k = 1 - tanh(alpha * rho)`` (the code writes ``tanh(alpha * relu(rho))``; the paper's Eq. 10 says
the same), the other modality's is 1. Inside the epoch window ``modulation_starts <= epoch <=
modulation_ends`` every encoder parameter's gradient (the code selects the 4-D convolution
kernels of the two ResNets) becomes ``k_u * g + N(0, std(g))``: the "GE" part adds Gaussian noise
whose standard deviation is that of the unmodulated gradient tensor (plus 1e-8), to *both*
modalities' encoders. With ``--modulation OGM`` the noise is left out. Defaults: alpha 0.1
(README; 0.8 recommended for CREMA-D), window epochs 0 to 50 (0-based epochs there).

What we adapted:

- **Unimodal outputs.** Our head is a residual MLP plus a linear ``out`` layer, so the weight
  split has no exact counterpart. We use the head on the fused vector with every other
  modality's block zeroed, minus ``(M - 1) / M`` of the head's output on an all-zero vector:
  ``out_m = head(P_m f) - (M - 1)/M * head(0)``. For a purely linear head (``W f + b``) this is
  exactly the original's ``W[:, block_m] f_m + b / M``, and the ``out_m`` then sum to the fused
  output (a test checks both). The head runs in eval mode (no dropout) and without gradient.
  Block ``m`` of ``fused`` is the representation our fusion keeps for modality ``m`` (late: its
  pooled features plus the fusion MLP's share; mult: the crossmodal stream that targets ``m``),
  so it is not purely unimodal for either backbone; in the original it is.
- **Fusions without per-modality blocks.** CGGM's MSA and Food models (``cggm_msa``,
  ``cggm_food``; also ``concat`` and ``casp_early``) fuse with one transformer over every
  modality's tokens, so ``fused`` has no block per modality to split (the CGGM paper runs OGM-GE on
  these models and says not how; its code has no baselines). There the unimodal output is the
  model's prediction with only modality ``m``'s inputs kept (the others zeroed) minus
  ``(M - 1)/M`` of the prediction with all zeroed: the same quantity for a concatenation into a
  linear layer, and the counterfactual AGM and MSLR use for any fusion. It costs ``M + 1`` extra
  forward passes per step, without gradient.
- **Regression.** There is no true-class probability. The confidence of a sample is
  ``exp(-|out_m - y|)``, a monotone map of the negative absolute error into (0, 1], the
  counterpart of ``softmax_y = exp(-cross-entropy)``. (The negative absolute error itself would
  make a ratio of two negative sums, which inverts which modality looks dominant.)
- **More than two modalities.** ``rho_m = score_m / mean_{k != m} score_k`` (for M = 2 exactly the
  original's pair of ratios); every modality with ``rho_m > 1`` is damped by its own coefficient.
- **Which parameters.** Every parameter of ``model.encoders[m]`` by default (our encoders are
  convolution + transformer; the original's 4-D rule would select only the input convolution).
  ``matrices_only=True`` keeps to parameters with two or more dimensions, the nearest analogue
  of the original's "kernels, not norms or biases".
- ``ratio_offset`` (default 0, the code) gives ``1 - tanh(alpha * (rho - offset))``; the project
  spec writes ``rho - 1``, which is ``ratio_offset=1``. The code and the paper use ``rho``.
- Epochs are numbered as the shared loop numbers them (from 1); the window is inclusive. The hook
  counts epochs through ``on_epoch_end``; the count is part of the hook's state (``state_dict``),
  so a run resumed from the loop's checkpoint continues it.
- Scores are computed (and logged) in every step; outside the window nothing is changed.

``on_epoch_end`` logs the epoch's mean applied coefficient per modality (``coeff_<m>``, 1 outside
the window), the mean ratio per modality (``ratio_<m>``) and the mean ratio of the dominant
modality (``ratio``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from mmrepro.data.loader import Batch
from mmrepro.methods.balance.common import EpochMeans, eval_mode, keep_only, per_modality
from mmrepro.methods.hooks import TrainingHook
from mmrepro.methods.params import Count, NonNegative
from mmrepro.methods.registry import HOOKS
from mmrepro.models.multimodal import ModelOutput


@torch.no_grad()
def unimodal_outputs(model: nn.Module, batch: Batch, fused: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-modality outputs, summing to about the fused output; no gradient, the model in eval mode.

    A fusion whose ``fused`` is one block per modality (``model.fusion.modality_blocks``): the head
    with every other block zeroed, ``head(P_m f) - (M - 1)/M * head(0)``; for a linear head ``W f + b``
    this is ``W[:, block_m] f_m + b / M``, OGM-GE's split of its fusion layer. Any other fusion (a
    joint transformer over all modalities' tokens, as CGGM's MSA and Food models): the whole model
    with only modality ``m``'s inputs kept, ``v({m}) - (M - 1)/M * v({})`` (``v(S)``: the prediction
    with the inputs outside ``S`` zeroed), which for a concatenation into a linear layer over
    encoders that map zeros to zeros is again exactly the weight split.
    """
    names = list(model.names)
    n = len(names)
    outs = {}
    if not getattr(model.fusion, "modality_blocks", False):
        with eval_mode(model):
            base = model(keep_only(batch, ())).pred
            for m in names:
                outs[m] = model(keep_only(batch, {m})).pred - base * (n - 1) / n
        return outs
    if fused.shape[-1] % n:
        raise ValueError(f"fused width {fused.shape[-1]} is not {n} equal per-modality blocks")
    d = fused.shape[-1] // n
    fused = fused.detach()
    with eval_mode(model.head):
        base = model.head(torch.zeros_like(fused[:1]))
        for i, m in enumerate(names):
            kept = torch.zeros_like(fused)
            kept[:, i * d:(i + 1) * d] = fused[:, i * d:(i + 1) * d]
            o = model.head(kept) - base * (n - 1) / n
            outs[m] = o.squeeze(-1) if model.task_type == "regression" else o
    return outs


def true_confidence(out_m: torch.Tensor, y: torch.Tensor, task_type: str) -> torch.Tensor:
    """Per-sample confidence ``(B,)``: softmax probability of the true class, or for regression
    ``exp(-|out_m - y|)``."""
    if task_type == "regression":
        return torch.exp(-(out_m - y).abs())
    return out_m.softmax(-1).gather(1, y.long()[:, None]).squeeze(1)


def discrepancy_ratios(scores: Sequence[float]) -> list[float]:
    """``rho_m = score_m / mean_{k != m} score_k``; for two modalities ``[s_a / s_b, s_b / s_a]``."""
    n = len(scores)
    if n < 2:
        return [1.0] * n
    total = float(sum(scores))
    return [float(s) / max((total - float(s)) / (n - 1), 1e-12) for s in scores]


def ogm_coefficient(ratio: float, alpha: float, ratio_offset: float = 0.0) -> float:
    """``1 - tanh(alpha * (rho - offset))`` for a dominant modality (``rho > 1``), else 1."""
    if ratio > 1.0:
        return 1.0 - math.tanh(alpha * max(ratio - ratio_offset, 0.0))
    return 1.0


@HOOKS.register("ogm_ge")
class OGMGE(TrainingHook):
    """Damp the dominant modality's encoder gradients by ``1 - tanh(alpha * rho)``, plus GE noise."""

    def __init__(self, alpha: NonNegative = 0.1, modulation_starts: Count = 0, modulation_ends: Count = 50,
                 ge: bool = True, ratio_offset: float = 0.0, matrices_only: bool = False):
        self.alpha, self.ge, self.ratio_offset = float(alpha), bool(ge), float(ratio_offset)
        self.modulation_starts, self.modulation_ends = int(modulation_starts), int(modulation_ends)
        self.matrices_only = bool(matrices_only)
        self.epoch = 1
        self.last_ratios: dict[str, float] = {}
        self.last_coeffs: dict[str, float] = {}
        self._means = EpochMeans()

    def setup(self, model: nn.Module, loss_fn, optimizer: torch.optim.Optimizer) -> None:
        self.epoch = 1
        self._means = EpochMeans()

    @property
    def active(self) -> bool:
        return self.modulation_starts <= self.epoch <= self.modulation_ends

    def coefficients(self, model: nn.Module, batch: Batch, out: ModelOutput) -> tuple[dict[str, float], dict[str, float]]:
        """This step's ratios and coefficients, per modality."""
        outs = unimodal_outputs(model, batch, out.fused)
        names = list(model.names)
        scores = [float(true_confidence(outs[m], batch.y, model.task_type).sum()) for m in names]
        ratios = dict(zip(names, discrepancy_ratios(scores)))
        coeffs = {m: ogm_coefficient(ratios[m], self.alpha, self.ratio_offset) for m in names}
        return ratios, coeffs

    def after_backward(self, model: nn.Module, batch: Batch, out: ModelOutput) -> None:
        if len(model.names) < 2:
            return
        ratios, coeffs = self.coefficients(model, batch, out)
        active = self.active
        applied = coeffs if active else {m: 1.0 for m in coeffs}
        self.last_ratios, self.last_coeffs = ratios, applied
        self._means.add({**per_modality("coeff", applied), **per_modality("ratio", ratios),
                         "ratio": max(ratios.values())})
        if not active:
            return
        for m in model.names:
            for p in model.encoders[m].parameters():
                if p.grad is None or (self.matrices_only and p.dim() < 2):
                    continue
                g = p.grad
                new = g * applied[m]
                if self.ge:
                    std = g.std() if g.numel() > 1 else g.new_zeros(())
                    new = new + torch.randn_like(g) * (std + 1e-8)
                p.grad = new

    def on_epoch_end(self, epoch: int, model: nn.Module, valid) -> dict[str, float]:
        values = self._means.pop()
        self.epoch = epoch + 1
        return values

    def state_dict(self) -> dict:
        """Epoch counter, the last ratios / coefficients and the epoch's running means (the GE noise
        comes from torch's global generator, which the loop's checkpoint keeps)."""
        return {"epoch": self.epoch, "last_ratios": dict(self.last_ratios), "last_coeffs": dict(self.last_coeffs),
                "means": self._means.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.last_ratios, self.last_coeffs = dict(state["last_ratios"]), dict(state["last_coeffs"])
        self._means.load_state_dict(state["means"])
