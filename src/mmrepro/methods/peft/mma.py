"""MMA, the Multi-Modal Adapter (Yang et al., CVPR 2024), on the frozen multimodal backbone:
per-modality down- and up-projections around one projection shared by all modalities, on the
higher layers of every modality encoder.

Sources read
------------
- Whether the Wander paper (arXiv 2412.08979) compares against this method could not be checked:
  only its abstract and introduction are in the stored copies; the project's spec names it as one of
  the likely multimodal PEFT baselines.
- The official repository ``ZjjConan/Multi-Modal-Adapter`` (README with the paper's abstract and
  contributions, ``trainers/mmadapter.py``, ``clip/model.py``, ``clip/gsl.py``,
  ``configs/trainers/MultiModalAdapter/vit_b16_ep5.yaml``). Nothing is copied from it. The paper's
  PDF was not in the stored copies; the README states its findings: higher layers hold the
  dataset-specific (discriminative) knowledge, lower layers the generalisable one, so MMA is put on
  a few higher layers only, and a shared projection aligns the two branches.

What is confirmed (official code, CLIP ViT-B/16: an image and a text transformer of 12 layers)
---------------------------------------------------------------------------------------------
- For every adapted layer index l there are three pieces: an image adapter and a text adapter, each
  a down-projection ``d -> b`` with ReLU and an up-projection ``b -> d``, and a *shared* adapter
  ``b -> b`` with ReLU used by both branches. The image branch computes
  ``up_img(shared(down_img(ln_1(x))))``, the text branch the same with its own down/up.
- Placement: a branch parallel to the whole residual block. It reads the block's input ``x`` through
  the block's own (frozen) first LayerNorm and its output, times a fixed scale, is added to the
  block's output: ``x_out = block(x) + s * branch(ln_1(x))``.
- Layers: ``ADAPTER_START = 5`` to ``ADAPTER_END = 12`` of 12 (the upper two thirds), bottleneck
  ``ADAPTER_DIM = 32``, scale ``ADAPTER_SCALE = 0.001`` in the base-to-novel config. (Index 0, the
  embedding level, would also be adaptable; the configs start above it.)
- Initialisation: every linear layer Kaiming-normal (fan_out, ReLU gain), biases zero. The adapter
  is therefore not zero at the start; the small scale keeps the model close to the frozen one.
- A gradient-scaling layer (``clip/gsl.py``) multiplies the gradient reaching the branch output by
  ``1 / s`` and the gradient the branch sends back into ``x`` by ``s``: the forward pass is
  ``block(x) + s * branch``, the backbone's gradients are exact, and the adapter's parameters get
  gradients as if the branch were not scaled (under SGD, a learning rate ``1 / s`` times larger).
- Only the adapters train (CLIP's text classifier comes from frozen class-name embeddings).

Our adaptation to this project's backbones (per-modality transformer encoders + a fusion module)
-----------------------------------------------------------------------------------------------
M branches instead of two: each modality encoder is a branch with its own down/up projections,
and the projection of depth l is shared by all M of them (CLIP is M = 2). Branches may have
different widths d_m (the shared projection lives in the bottleneck). The adapted layers are the
top ``layers`` of every encoder (default: the upper two thirds, rounded up, as 8 of 12 in the
official config; all layers of a 1-layer encoder); the j-th adapted layer of every encoder (encoders
aligned at their top layer) shares one projection.
Each adapted layer (``nn.TransformerEncoderLayer`` or the presets' MulT ``EncoderLayer``; backbones
without per-modality encoder layers, ``casp_early`` and ``mplmm_mult``, are refused) returns ``layer(x) + s * up_m(relu(shared(relu(down_m(
norm1(x))))))`` with its own frozen ``norm1``. The fusion module is not a branch of a two-tower model
and stays frozen (MMA has nothing there); the prediction head trains by default (``train_head``), as
for every PEFT baseline here, since a new task needs a new head. ``grad_rescale`` (default on)
reproduces the official gradient scaling. Defaults: ``bottleneck=32``, ``scale=0.001`` (official);
note that with this project's Adam optimiser and full training sets the scale sets how far the
adapters can move the model, and a larger one (e.g. 0.1) may be the fairer setting.

Trainable parameters
--------------------
With k adapted layers per encoder, d_m the widths, b the bottleneck::

    P = k * ( sum_m (d_m b + b + b d_m + d_m)   # per-modality down and up projections
              + b b + b )                        # the shared projection
      (+ H, the prediction head, if train_head)

``MMA.param_count(model)`` evaluates it on a backbone (the same before and after ``apply``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mmrepro.methods.params import Positive, PositiveInt
from mmrepro.methods.peft.baselines import head_count
from mmrepro.methods.registry import TRANSFORMS
from mmrepro.methods.transforms import ModelTransform
from mmrepro.models.gradients import scale_grad
from mmrepro.models.stages import block_parts, staged_encoders
from mmrepro.models.transformer import EncoderLayer


class MMAUnit(nn.Module):
    """The adapters of one depth: per-modality ``down``/``up`` and the ``shared`` projection."""

    def __init__(self, dims: list[int], bottleneck: int, scale: float, grad_rescale: bool):
        super().__init__()
        self.scale, self.grad_rescale = float(scale), bool(grad_rescale)
        self.down = nn.ModuleList(nn.Linear(d, bottleneck) for d in dims)
        self.shared = nn.Linear(bottleneck, bottleneck)
        self.up = nn.ModuleList(nn.Linear(bottleneck, d) for d in dims)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in [*self.down, self.shared, *self.up]:
            nn.init.kaiming_normal_(lin.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(lin.bias)

    def branch(self, x: torch.Tensor, norm: Callable[[torch.Tensor], torch.Tensor], m: int) -> torch.Tensor:
        """``s * up_m(relu(shared(relu(down_m(norm(x))))))`` with the official gradient scaling."""
        s = self.scale
        if self.grad_rescale:
            x = scale_grad(x, s)
        y = self.up[m](F.relu(self.shared(F.relu(self.down[m](norm(x)))))) * s
        if self.grad_rescale:
            y = scale_grad(y, 1.0 / s)
        return y


def unit_param_count(dims: list[int], bottleneck: int) -> int:
    b = bottleneck
    return sum(d * b + b + b * d + d for d in dims) + b * b + b


class MMABranch:
    """Mixin for a transformer layer class: its output plus the MMA branch on its input, read through
    the layer's own input norm; ``_mma = (unit, modality index)`` refers to a unit registered once on
    the model (``model.mma``). Set by a class swap, so the layer keeps its parameters and names."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        unit, m = self._mma
        return super().forward(x, *args, **kwargs) + unit.branch(x, block_parts(self).input_norm, m)


class MMAEncoderLayer(MMABranch, nn.TransformerEncoderLayer):
    """The light encoders' ``nn.TransformerEncoderLayer`` with the MMA branch."""


class MMAPresetLayer(MMABranch, EncoderLayer):
    """The presets' MulT ``EncoderLayer`` with the MMA branch."""


#: each plain layer class and its MMA class
MMA_LAYERS = {nn.TransformerEncoderLayer: MMAEncoderLayer, EncoderLayer: MMAPresetLayer}


def default_layers(depth: int) -> int:
    """The upper two thirds of ``depth`` layers, rounded up (8 of 12 as the official config)."""
    return math.ceil(2 * depth / 3)


@TRANSFORMS.register("mma")
class MMA(ModelTransform):
    """Freeze the backbone and add MMA on the top ``layers`` of every encoder (module docstring)."""

    needs_modality_layers = True

    def __init__(self, bottleneck: PositiveInt = 32, scale: Positive = 0.001, layers: PositiveInt | None = None,
                 grad_rescale: bool = True, train_head: bool = True):
        self.bottleneck, self.scale = int(bottleneck), float(scale)
        self.layers = None if layers is None else int(layers)
        self.grad_rescale, self.train_head = bool(grad_rescale), bool(train_head)

    def _plan(self, model: nn.Module) -> tuple[int, list[int]]:
        """``(k, widths)``: adapted layers per encoder and the encoders' widths."""
        encoders = staged_encoders(model, "mma")
        depths = [len(encoders[m].layers) for m in model.names]
        k = default_layers(min(depths)) if self.layers is None else self.layers
        if k > min(depths):
            raise ValueError(f"mma: layers={k} but the shallowest encoder has {min(depths)}")
        return k, [encoders[m].width for m in model.names]

    def param_count(self, model: nn.Module) -> int:
        k, dims = self._plan(model)
        return k * unit_param_count(dims, self.bottleneck) + (head_count(model) if self.train_head else 0)

    def apply(self, model: nn.Module) -> nn.Module:
        if hasattr(model, "mma"):
            raise ValueError("mma: the model already has MMA adapters")
        k, dims = self._plan(model)
        adapted = []
        for i, m in enumerate(model.names):
            ls = list(model.encoders[m].layers)
            for j, layer in enumerate(ls[len(ls) - k:]):
                if type(layer) not in MMA_LAYERS:
                    raise TypeError(f"mma: encoder {m!r} has a {type(layer).__name__}, expected a plain "
                                    f"{' or '.join(c.__name__ for c in MMA_LAYERS)} (was the model transformed before?)")
                adapted.append((layer, j, i))
        like = next(model.parameters())
        units = nn.ModuleList(MMAUnit(dims, self.bottleneck, self.scale, self.grad_rescale) for _ in range(k))
        units.to(device=like.device, dtype=like.dtype)
        model.requires_grad_(False)
        for layer, j, i in adapted:
            layer.__class__ = MMA_LAYERS[type(layer)]
            layer._mma = (units[j], i)  # a tuple: the unit is not registered under the layer
        model.mma = units  # registered once; units[j]: j-th adapted layer of every encoder (aligned at the top)
        units.requires_grad_(True)
        if self.train_head:
            model.head.requires_grad_(True)
        return model
