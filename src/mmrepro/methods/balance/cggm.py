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
``projt`` unused); BraTS never clips gradients although ``--clip`` exists; the scripts crash
without CUDA. BraTS: next paragraph.

BraTS (``src/segtrain.py``, ``models/segmodel.py``, ``run/brats_run.py``, ``src/eval_metrics.py``)
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Same seven steps, with these pieces. The model (2-D slices; four ResNet-101 + ASPP branches, a
DeepLabv3+ decoder over the concatenated branches) returns, besides the logits, each modality's
ASPP output and its low-level (first residual stage) map, both cloned and detached. The
"classifiers" are four segmentation decoders of the model's own decoder design, each built for one
branch instead of four, each reading its modality's detached deep and low-level maps and giving
per-pixel 4-class logits (bilinearly upsampled to the 160x160 slice). They are trained with the
model's loss (weighted CE + soft foreground Dice), summed over the modalities, by SGD at
``cls_lr = 6e-3`` with the model's momentum 0.9 and weight decay 3e-4 (no schedule for them).
Utilisation ``acc_i`` is classifier ``i``'s batch Dice (``train_eval_seg``): argmax labels; for
ET (class 3), TC (1 or 3) and WT (non-zero), a per-slice ``(2 |p & g| + 2 eps) / (|p| + |g| + 2 eps)``
with ``eps = 1e-3`` (a region absent from both scores 1), averaged over the batch's slices; then the
mean of the three regions. The
direction cosines compare the weight of each classifier decoder's final 1x1 convolution with that of
the fused decoder's final 1x1 convolution (both ``(4, 256, 1, 1)``), clones taken before either
optimizer step; ``l_gm`` divides by the hard-coded four and reaches the fused final convolution at
the next step. The magnitude step scales the gradients of parameters whose names contain
``vision_encoder`` (by ``coeff_0 * rho``) or ``text_encoder`` (``coeff_1 * rho``), the same block
as the Food (image + text) trainer's ``src/foodtrain.py``. The segmentation model's parameters
are called ``backbone1..4``, ``aspp1..4`` and ``decoder``, so nothing is scaled: **on BraTS only
the direction term acts** (and even with matching names only two of the four modalities would have
been scaled). ``rho = 1.0``,
``lambda = 0.1``; the model's SGD follows a per-iteration cosine schedule; nothing is clipped.

Our implementation
------------------
The same order, with the shared loop's hook points: ``loss`` adds ``lam * l_gm`` from the
previous step (step 1), ``after_backward`` does steps 2 to 6 (``UnimodalProbes.step`` does step 2
and the classifier optimizer step of step 7; the cosine uses the probes' ``out`` weights as they
were *before* that update, as the official code), and the loop clips and steps. Every parameter
of ``model.encoders[m]`` except ``proj`` (``pos``, ``transformer``, ``norm``) is scaled; the
proj, the fusion and the head are not. ``on_epoch_end`` logs ``util_<m>`` (probe accuracy on the
validation split, probes and model in eval mode), ``coeff_<m>`` (mean coefficient over the
epoch's steps), ``coeff_median_<m>`` (their median: the mean is dominated by the few steps whose
denominator is about 0, values up to ~1e5 and beyond), ``coeff_extreme_steps`` and
``coeff_extreme_share`` (the epoch's steps whose denominator ``|S|`` is below ``guard_eps``: their
coefficients explode in the faithful formula and are clamped in the guarded one),
``probe_train_acc_<m>`` (mean batch accuracy) and ``l_gm`` (epoch mean). ``run_summary`` gives the
run's totals (``coeff_steps``, ``coeff_extreme_steps``, ``coeff_extreme_share``) for ``metrics.json``.

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
- The hook's state (probes and their optimizer, previous accuracies, the pending ``l_gm`` or the
  kept probe gradients, the epoch's sums) is part of the loop's resumable checkpoint
  (``state_dict``). ``l_gm`` carries a graph, so it is saved as the tensors it was built from (the
  coefficients, the probes' ``out`` weights and the fused weight's blocks as they were) and built
  again on resume, the same graph reaching the resumed model's fused out weight.

On the segmentation models (BraTS: ``deeplab2d`` and ``unet3d``)
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
The same hook and the same step order (:class:`SegmentationProbes`). Each classifier is the
model's ``new_probe()``, a freshly initialised decoder of the model's own design for one modality.
On ``deeplab2d`` (:mod:`mmrepro.models.deeplab`, CGGM's own model, trained on 2-D slices) that is
exactly the official classifier: a DeepLabv3+ decoder over modality ``m``'s detached low-level map
and ASPP output, batch Dice per slice, cosines between the ``(K, d, 1, 1)`` final convolutions; the
magnitude step (``seg_magnitude=True``) scales branch ``m`` (ResNet and ASPP), the parameters the
official code's names were meant to reach. What follows describes the carry-over to our 3-D U-Net:

- **Classifiers**: as the official ones are copies of the model's decoder design for one branch,
  ours are, per modality, a decoder of the model's own design (:class:`~mmrepro.models.segmentation.Decoder`
  with the model's widths and blocks, freshly initialised) plus a 1x1x1 ``out`` convolution to the
  ``K`` classes. The official classifier reads the two taps its fused decoder reads (deep and
  low-level), from one modality and detached; ours reads the taps our fused decoder reads, every
  level of encoder ``m``'s feature pyramid, detached. ``ModelOutput`` only carries the bottleneck,
  so the hook registers a forward hook on each ``model.encoders[m]`` that keeps detached views of
  its level maps (training forwards, and the hook's own validation pass); each step checks that
  the kept bottleneck is the one behind ``out.tokens[m]``. Logits are cropped to the label size as
  the model's. Loss: the task loss (:func:`~mmrepro.train.segmentation_loss`), summed over the
  modalities; each modality's term is back-propagated on its own (the probes share no parameter,
  so the gradients equal those of the sum, with one probe's activations alive at a time).
  Optimizer: ``cls_optim`` at ``cls_lr`` with ``cls_weight_decay`` and ``cls_momentum`` (the
  official BraTS values: ``SGD``, 6e-3, 3e-4, 0.9; set them per dataset in the config).
- **Utilisation** ``acc_m``: probe ``m``'s batch Dice as ``train_eval_seg`` (:func:`seg_batch_dice`),
  per case (a volume) where the official code has per slice. Coefficients: the same formula.
- **Direction**: ``cos_m`` between probe ``m``'s ``out`` weight and the model's ``head`` weight,
  both ``(K, w_0, 1, 1, 1)``: whole tensors, as the official ``(4, 256, 1, 1)`` ones. The weights
  reading reaches only ``model.head.weight``; ``direction="gradients"`` uses the gradients of those
  two weights (second order, it reaches the encoders).
- **Magnitude**: ``seg_magnitude=False`` (default) is the official behaviour, no segmentation
  parameter is scaled (its step names parameters the model does not have), so only the direction
  term acts. ``seg_magnitude=True`` applies the method as the paper describes it: every parameter
  of ``model.encoders[m]`` (there is no separate input projection) has its gradient multiplied by
  ``coeff_m * rho``. On sequence models the flag is ignored (the magnitude always applies there).
- Logged per epoch, under the sequence keys: ``util_<m>`` (probe ``m``'s per-case Dice, the mean of
  ET/TC/WT as :class:`~mmrepro.metrics.DiceMeter`, over the validation split, model and probes in
  eval mode), ``coeff_<m>``, ``probe_train_acc_<m>`` (mean batch Dice) and ``l_gm``.
- Differences from the official classifiers beyond the backbone: instance norm and no dropout (our
  decoder's design) where the DeepLab decoder has batch norm and dropout 0.5 / 0.1. Cost: one extra
  decoder forward and backward per modality per step, and one extra validation forward per epoch.
  The segmentation head must give BraTS's 4 classes (the Dice regions are BraTS's).
"""

from __future__ import annotations

import statistics
import weakref
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from mmrepro.data.loader import Batch, SplitLoader
from mmrepro.methods.balance.probes import UnimodalProbes
from mmrepro.methods.hooks import TrainingHook
from mmrepro.methods.params import NonNegative, OneOf, Positive, PositiveInt, Rate
from mmrepro.methods.registry import HOOKS
from mmrepro.metrics import DiceMeter
from mmrepro.models.multimodal import ModelOutput

DIRECTIONS = ("weights", "gradients")
#: BraTS evaluation regions on internal labels (as ``mmrepro.data.brats.REGIONS``): ET, TC, WT.
SEG_REGIONS = {"et": (3,), "tc": (1, 3), "wt": (1, 2, 3)}
SEG_CLASSES = 4


def modulation_coefficients(d: list[float], guarded: bool = False, guard_eps: float = 0.05) -> list[float]:
    """``coeff_i = (S - d_i) / S`` with ``S = sum(d) + 1e-8``: the share of the improvement made by
    the other modalities. ``guarded`` clamps ``|S|`` to at least ``guard_eps`` (sign kept, 0 -> +)."""
    s = sum(d) + 1e-8
    if guarded:
        s = max(abs(s), guard_eps) * (1.0 if s >= 0 else -1.0)
    return [(s - di) / s for di in d]


def extreme_denominator(d: list[float], guard_eps: float = 0.05) -> bool:
    """Whether this step's denominator ``S = sum(d) + 1e-8`` is smaller in size than ``guard_eps``: the
    steps whose coefficients explode in the faithful formula (by up to 1e8 when ``S`` is 1e-8) and
    are clamped in the guarded one."""
    return abs(sum(d) + 1e-8) < guard_eps


def direction_loss(coeffs: list[float], cos: list[torch.Tensor]) -> torch.Tensor:
    """``l_gm = (sum_i |coeff_i| - sum_i coeff_i * cos_i) / M`` (a tensor carrying ``cos``'s graph)."""
    m = len(coeffs)
    aligned = sum(c * k for c, k in zip(coeffs, cos))
    return (sum(abs(c) for c in coeffs) - aligned) / m


def is_segmentation(model: nn.Module) -> bool:
    return getattr(model, "task_type", None) == "segmentation"


def fused_out_weight(model: nn.Module) -> torch.Tensor:
    """The fused model's last layer weight the direction term compares: ``head.out.weight`` of the
    sequence models, the 1x1x1 ``head`` convolution's weight of the segmentation model."""
    return model.head.weight if is_segmentation(model) else model.head.out.weight


def head_blocks(model: nn.Module, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The part of a fused-out-weight-shaped tensor that each modality's probe is compared with.

    Segmentation: the whole ``(K, w_0, 1, 1, 1)`` tensor for every modality (as the official code).
    Sequences, a ``(out_dim, F)`` tensor: ``F == d``, the whole tensor for every modality (the
    official code's case); ``F == M * d``, block ``i`` of the concatenated fused vector, in the
    fusion's modality order.
    """
    if is_segmentation(model):
        return {m: weight for m in model.names}
    names = list(getattr(model.fusion, "names", model.names))
    d = model.encoders[names[0]].proj.out_channels
    width = weight.shape[1]
    if width == d:
        return {m: weight for m in names}
    if width == d * len(names):
        return {m: weight[:, i * d:(i + 1) * d] for i, m in enumerate(names)}
    raise ValueError(f"cggm: the head's out layer reads {width} features; expected d={d} or "
                     f"M*d={d * len(names)} (one d-wide block per modality)")


def make_optimizer(params, optim: str, lr: float, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    """``torch.optim.<optim>``; ``momentum`` only for SGD."""
    kw = {"momentum": momentum} if optim == "SGD" else {}
    return getattr(torch.optim, optim)(params, lr=lr, weight_decay=weight_decay, **kw)


# -------------------------------------------------------------------------------------------------
# Segmentation probes


@torch.no_grad()
def seg_batch_dice(logits: torch.Tensor, y: torch.Tensor, eps: float = 1e-3) -> float:
    """The official ``train_eval_seg`` per case: argmax labels; per region (ET, TC, WT on internal
    labels) and case ``(2 * |p & g| + 2 eps) / (|p| + |g| + 2 eps)``, averaged over the batch's
    cases; the mean of the three regions. ``logits`` ``(B, K, *S)``, ``y`` ``(B, *S)``."""
    pred = logits.argmax(1)
    axes = tuple(range(1, pred.dim()))
    scores = []
    for classes in SEG_REGIONS.values():
        p = torch.isin(pred, pred.new_tensor(classes)).float()
        g = torch.isin(y, y.new_tensor(classes)).float()
        inter = (p * g).sum(axes) + eps
        union = p.sum(axes) + g.sum(axes) + 2 * eps
        scores.append((2 * inter / union).mean())
    return float(sum(scores) / len(scores))


class SegmentationProbes(nn.Module):
    """One classifier per modality (the model's ``new_probe()``), its optimizer, and the capture of
    the encoders' level maps: the same interface as :class:`~mmrepro.methods.balance.probes.UnimodalProbes`
    (``step``, ``out_weight``, ``evaluate``, ``optimizer``). Call :meth:`attach` with the model."""

    def __init__(self, names: list[str], new_probe, *, lr: float, optim: str = "Adam", weight_decay: float = 0.0,
                 momentum: float = 0.0):
        super().__init__()
        self.names = list(names)
        self.probes = nn.ModuleDict({m: new_probe() for m in self.names})
        self.optimizer = make_optimizer(self.parameters(), optim, lr, weight_decay, momentum)
        self._levels: dict[str, list[torch.Tensor]] = {}
        self._handles: list = []
        self._capture_eval = False

    @classmethod
    def for_model(cls, model: nn.Module, **kw) -> "SegmentationProbes":
        """Probes sized as the model's decoder and head, on the model's device, attached to it."""
        num_classes = model.head.out_channels
        if num_classes != SEG_CLASSES:
            raise ValueError(f"cggm on segmentation measures the BraTS Dice regions: the model must predict "
                             f"{SEG_CLASSES} classes, not {num_classes}")
        probes = cls(model.names, model.new_probe, **kw)
        probes = probes.to(next(model.parameters()).device)
        probes.attach(model)
        return probes

    # ---------------------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        """Keep detached views of each encoder's level maps at every training forward (and during
        :meth:`evaluate`). The forward hooks hold only a weak reference to the probes."""
        self.detach_hooks()
        ref = weakref.ref(self)

        def keeper(m: str):
            def capture(module, inputs, output):
                probes = ref()
                if probes is not None and (module.training or probes._capture_eval):
                    probes._levels[m] = [t.detach() for t in output]
            return capture

        self._handles = [model.encoders[m].register_forward_hook(keeper(m)) for m in self.names]

    def detach_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._levels = [], {}

    def levels(self, out: ModelOutput) -> dict[str, list[torch.Tensor]]:
        """The kept level maps of the forward that produced ``out`` (checked on the bottleneck)."""
        for m in self.names:
            kept = self._levels.get(m)
            if kept is None or kept[-1].data_ptr() != out.tokens[m].data_ptr():
                raise RuntimeError(f"cggm: no level maps of encoder {m!r} kept for this forward pass (the probes "
                                   f"must be attached to the model that produced the output)")
        return {m: self._levels[m] for m in self.names}

    # ---------------------------------------------------------------------------------------------
    def forward(self, out: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        """Per-modality logits ``(B, K, *S)`` from the detached level maps."""
        levels = self.levels(out)
        size = tuple(batch.y.shape[1:])
        return {m: self.probes[m](levels[m], size) for m in self.names}

    def out_weight(self, m: str) -> torch.Tensor:
        """The ``out`` convolution weight ``(K, w_0, 1, 1, 1)`` of modality ``m``'s probe."""
        return self.probes[m].out.weight

    def step(self, out: ModelOutput, batch: Batch, loss_fn) -> dict[str, float]:
        """One optimizer step of every probe on the sum of their task losses; returns each probe's
        batch Dice (:func:`seg_batch_dice`) from the logits before the update. The gradients stay in
        the probes' ``.grad`` until the next ``step``."""
        self.train()
        self.optimizer.zero_grad(set_to_none=True)
        levels = self.levels(out)
        size = tuple(batch.y.shape[1:])
        acc = {}
        for m in self.names:  # one backward per probe: disjoint parameters, so the sum's gradients
            logits = self.probes[m](levels[m], size)
            loss_fn(logits, batch.y).backward()
            acc[m] = seg_batch_dice(logits.detach(), batch.y)
        self._levels = {}
        self.optimizer.step()
        return acc

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader) -> dict[str, float]:
        """Each probe's per-case Dice (mean of ET/TC/WT, :class:`~mmrepro.metrics.DiceMeter`) over
        ``loader``, model and probes in eval mode (then restored)."""
        was_model, was_self = model.training, self.training
        model.eval()
        self.eval()
        self._capture_eval = True
        device = next(self.parameters()).device
        meters = {m: DiceMeter() for m in self.names}
        try:
            for batch in loader:
                batch = batch.to(device)
                preds = self(model(batch), batch)
                y = batch.y.cpu().numpy()
                for m in self.names:
                    meters[m].update(preds[m].argmax(1).to(torch.uint8).cpu().numpy(), y)
        finally:
            self._capture_eval = False
            self._levels = {}
            model.train(was_model)
            self.train(was_self)
        return {m: meters[m].result()["dice_mean"] if meters[m].n else float("nan") for m in self.names}


# -------------------------------------------------------------------------------------------------
@HOOKS.register("cggm")
class CGGM(TrainingHook):
    """Classifier-guided gradient modulation (see the module docstring for the method and the code).

    Defaults are the official MOSI run script's (``run/mosi_run.py``). ``cls_layers``, ``cls_heads``,
    ``cls_dropout`` and ``faithful_double_hidden`` shape the sequence probes only; ``seg_magnitude``
    acts on segmentation models only. ``magnitude=False`` turns the gradient scaling off (the
    paper's Table 6 "direction only"; "magnitude only" is ``lam=0``).
    """

    needs_modality_layers = True  # its classifiers and gradient scaling act on the encoders' transformers

    tracks_utilisation = True

    def __init__(self, rho: Positive = 1.3, lam: NonNegative = 0.2, cls_lr: Positive = 5e-4, cls_layers: PositiveInt = 2,
                 cls_heads: PositiveInt | None = None, cls_dropout: Rate = 0.15, cls_optim: str = "Adam",
                 cls_weight_decay: NonNegative = 0.0, cls_momentum: NonNegative = 0.0,
                 faithful_double_hidden: bool = True, direction: Annotated[str, OneOf(DIRECTIONS)] = "weights",
                 guarded: bool = False, guard_eps: Positive = 0.05, seg_magnitude: bool = False,
                 magnitude: bool = True):
        if not hasattr(torch.optim, cls_optim):
            raise ValueError(f"cggm: unknown cls_optim {cls_optim!r} (a torch.optim class name)")
        if cls_momentum and cls_optim != "SGD":
            raise ValueError(f"cggm: cls_momentum applies to cls_optim='SGD' only, not {cls_optim!r}")
        self.rho, self.lam = rho, lam
        self.optim_kw = dict(lr=cls_lr, optim=cls_optim, weight_decay=cls_weight_decay, momentum=cls_momentum)
        self.probe_kw = dict(layers=cls_layers, heads=cls_heads, dropout=cls_dropout, lr=cls_lr,
                             optim=cls_optim, weight_decay=cls_weight_decay,
                             faithful_double_hidden=faithful_double_hidden)
        self.direction, self.guarded, self.guard_eps = direction, guarded, guard_eps
        self.seg_magnitude, self.use_magnitude = seg_magnitude, bool(magnitude)
        self.probes: UnimodalProbes | SegmentationProbes | None = None

    # ---------------------------------------------------------------------------------------------
    def setup(self, model: nn.Module, loss_fn, optimizer: torch.optim.Optimizer) -> None:
        if len(model.names) < 2:
            raise ValueError("cggm needs at least two modalities (with one, coeff = 1e-8 / (d + 1e-8))")
        self.names = list(model.names)
        self.loss_fn = loss_fn
        if isinstance(self.probes, SegmentationProbes):
            self.probes.detach_hooks()  # set up again: drop the capture hooks of the earlier model
        self.segmentation = is_segmentation(model)
        if self.segmentation:
            self.probes = SegmentationProbes.for_model(model, **self.optim_kw)
        else:
            self.probes = UnimodalProbes.for_model(model, **self.probe_kw)
            if self.optim_kw["momentum"]:
                self.probes.optimizer = make_optimizer(self.probes.parameters(), **self.optim_kw)
            head_blocks(model, model.head.out.weight)  # fail early on an unsupported head width
        self.magnitude = self.use_magnitude and (self.seg_magnitude or not self.segmentation)
        self._model_ref = weakref.ref(model)  # to build ``l_gm`` again on resume
        self.prev_acc = {m: 0.0 for m in self.names}
        self.l_gm: torch.Tensor | None = None  # weights mode: built at step t, used at step t+1
        self._l_gm_inputs: dict | None = None  # what ``l_gm`` was built from (for the checkpoint)
        self.probe_grads: dict[str, torch.Tensor] | None = None  # gradients mode
        self.last_acc: dict[str, float] = {}
        self.last_coeffs: dict[str, float] = {}
        self.last_l_gm: float | None = None
        self._run_steps = self._run_extreme = 0
        self._reset_epoch()

    def _reset_epoch(self) -> None:
        self._coeffs: dict[str, list[float]] = {m: [] for m in self.names}
        self._extreme = 0
        self._sum_coeff = {m: 0.0 for m in self.names}
        self._sum_acc = {m: 0.0 for m in self.names}
        self._sum_l_gm, self._n_l_gm, self._steps = 0.0, 0, 0

    # ---------------------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: Batch, out: ModelOutput, task_loss: torch.Tensor) -> torch.Tensor:
        if self.direction == "weights":
            l_gm, self.l_gm = self.l_gm, None  # each direction term is used by exactly one step
            self._l_gm_inputs = None
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
        fused_grad, = torch.autograd.grad(task_loss, fused_out_weight(model), create_graph=True, retain_graph=True)
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
            self.l_gm = self._weights_direction_loss(model, [coeffs[m] for m in self.names], probe_w)
            self._record_l_gm(self.l_gm)
        else:
            self.probe_grads = {m: self.probes.out_weight(m).grad.detach().clone() for m in self.names}

        if self.magnitude:
            for m in self.names:
                scale = coeffs[m] * self.rho
                for name, p in model.encoders[m].named_parameters():
                    if name.startswith("proj.") or p.grad is None:
                        continue
                    p.grad.mul_(scale)

        self._steps += 1
        self._run_steps += 1
        if extreme_denominator(d, self.guard_eps):
            self._extreme += 1
            self._run_extreme += 1
        for m in self.names:
            self._coeffs[m].append(coeffs[m])
            self._sum_coeff[m] += coeffs[m]
            self._sum_acc[m] += acc[m]

    def _weights_direction_loss(self, model: nn.Module, coeffs: list[float], probe_w: dict[str, torch.Tensor],
                                fused: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The code's ``l_gm`` from the probes' ``out`` weights ``probe_w`` (detached) and clones of the
        fused out weight's blocks; ``fused`` (on resume) gives the clones' values as they were when
        the term was first built, the graph still reaching the model's fused out weight."""
        blocks = head_blocks(model, fused_out_weight(model))
        kept: dict[str, torch.Tensor] = {}

        def block_clone(m: str) -> torch.Tensor:
            # clone: the optimizer updates the weight in place before this term is back-propagated
            c = blocks[m].clone()
            if fused is not None:
                with torch.no_grad():
                    c.copy_(fused[m])
            kept[m] = c
            return c

        cos = [F.cosine_similarity(probe_w[m].flatten(), block_clone(m).flatten(), dim=0) for m in self.names]
        self._l_gm_inputs = {"coeffs": list(coeffs), "probe_w": dict(probe_w),
                             "fused": {m: c.detach() for m, c in kept.items()}}
        return direction_loss(coeffs, cos)

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
        values.update({f"coeff_median_{m}": statistics.median(self._coeffs[m]) if n else float("nan")
                       for m in self.names})
        values["coeff_extreme_steps"] = float(self._extreme)
        values["coeff_extreme_share"] = self._extreme / n if n else float("nan")
        values.update({f"probe_train_acc_{m}": self._sum_acc[m] / n if n else float("nan") for m in self.names})
        values["l_gm"] = self._sum_l_gm / self._n_l_gm if self._n_l_gm else float("nan")
        self._reset_epoch()
        return values

    def run_summary(self) -> dict[str, float]:
        """Steps of the whole run and how many had an extreme denominator (``extreme_denominator``)."""
        share = self._run_extreme / self._run_steps if self._run_steps else float("nan")
        return {"coeff_steps": self._run_steps, "coeff_extreme_steps": self._run_extreme, "coeff_extreme_share": share}

    # ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Probes and their optimizer, the previous batch accuracies, the last step's values, the
        pending direction term (weights mode: what it is built from) or the kept probe gradients
        (gradients mode), and the epoch's running sums."""
        return {"probes": self.probes.state_dict(), "probe_optimizer": self.probes.optimizer.state_dict(),
                "prev_acc": dict(self.prev_acc), "last_acc": dict(self.last_acc),
                "last_coeffs": dict(self.last_coeffs), "last_l_gm": self.last_l_gm,
                "l_gm": self._l_gm_inputs if self.l_gm is not None else None,
                "probe_grads": None if self.probe_grads is None else dict(self.probe_grads),
                "sum_coeff": dict(self._sum_coeff), "sum_acc": dict(self._sum_acc),
                "sum_l_gm": self._sum_l_gm, "n_l_gm": self._n_l_gm, "steps": self._steps,
                "coeffs": {m: list(v) for m, v in self._coeffs.items()}, "extreme": self._extreme,
                "run_steps": self._run_steps, "run_extreme": self._run_extreme}

    def load_state_dict(self, state: dict) -> None:
        self.probes.load_state_dict(state["probes"])
        self.probes.optimizer.load_state_dict(state["probe_optimizer"])
        device = next(self.probes.parameters()).device
        self.prev_acc, self.last_acc = dict(state["prev_acc"]), dict(state["last_acc"])
        self.last_coeffs, self.last_l_gm = dict(state["last_coeffs"]), state["last_l_gm"]
        grads = state["probe_grads"]
        self.probe_grads = None if grads is None else {m: g.to(device) for m, g in grads.items()}
        self._sum_coeff, self._sum_acc = dict(state["sum_coeff"]), dict(state["sum_acc"])
        self._sum_l_gm, self._n_l_gm, self._steps = float(state["sum_l_gm"]), int(state["n_l_gm"]), int(state["steps"])
        self._coeffs, self._extreme = {m: list(v) for m, v in state["coeffs"].items()}, int(state["extreme"])
        self._run_steps, self._run_extreme = int(state["run_steps"]), int(state["run_extreme"])
        self.l_gm, self._l_gm_inputs = None, None
        pending = state["l_gm"]
        if pending is not None:
            model = self._model_ref()
            if model is None:
                raise RuntimeError("cggm: the model given to setup is gone; cannot rebuild the direction term")
            self.l_gm = self._weights_direction_loss(
                model, list(pending["coeffs"]), {m: w.to(device) for m, w in pending["probe_w"].items()},
                {m: f.to(device) for m, f in pending["fused"].items()})
