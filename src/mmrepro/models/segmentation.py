"""A multimodal 3-D U-Net for volume segmentation (BraTS): one encoder per MRI sequence, fusion
at every scale, one shared decoder.

Layout (for ``L`` levels, widths ``w_0 <= ... <= w_{L-1}``; level ``i`` has ``1/2^i`` resolution):

* **Encoders** (:class:`VolumeEncoder`), one per modality, as U-Net encoders (Ronneberger et al.
  2015; Cicek et al. 2016, 3-D): level 0 is a :class:`ConvBlock` at full resolution, each further
  level starts with a stride-2 convolution (learned downsampling, as nnU-Net) and widens to
  ``w_i``. A block is two 3x3x3 convolutions, each followed by instance normalisation and leaky
  ReLU: instance norm because 3-D batches are one or two volumes, where batch statistics are
  useless. ``blocks`` stacks that many blocks per level. Separate encoders per modality (not one
  encoder over the 4 channels) because the balance methods need to measure and steer each
  modality's own representation: ``model.encoders[m]`` is what they scale, probe and regroup.
* **Fusion** (:class:`ScaleFusion`), one per level: the modalities' feature maps are
  **concatenated** along channels and mixed by a 1x1x1 convolution back to ``w_i`` channels
  (+ instance norm + leaky ReLU). Concatenation rather than a sum: it lets the network weight
  each modality differently per scale (a sum fixes equal weights and needs the same width per
  modality), and it is what CGGM's BraTS model does (its DeepLab decoder reads the concatenated
  branches). Cost: ``M * w_i^2`` weights per level.
* **Decoder** (:class:`Decoder`), shared: from the fused bottleneck, per level a 2x transposed
  convolution to ``w_i`` channels, concatenation with the fused skip of that level and a block;
  then a 1x1x1 convolution ``head`` to ``K`` per-voxel class logits. ``Dropout3d`` (whole
  channels) acts on the fused bottleneck.

Inputs whose spatial size is not a multiple of ``2^(L-1)`` are zero-padded at the far end of each
axis (zero is the background of z-scored BraTS volumes) and the logits are cropped back, so any
converter crop works. A modality absent for a sample (``batch.present`` False) has its input
volume multiplied by zero before its encoder, as the ``zero_fill`` setting does for sequences
(so a model trained with missing modalities sees exactly zeros, whatever the setting did).

The forward returns the shared :class:`~mmrepro.models.output.ModelOutput`: ``pred`` the
logits ``(B, K, D, H, W)``; ``features[m]`` modality ``m``'s bottleneck averaged over space
``(B, d)``; ``tokens[m]`` that bottleneck flattened to ``(B, T, d)`` (``T`` = bottleneck voxels);
``fused`` the fused bottleneck averaged over space ``(B, d)``; ``d = w_{L-1}``.

Sizes from the shared model config (:func:`unet3d`): ``d_model`` is the bottleneck width ``d``
(the per-modality feature width, as for the sequence backbones), the widths halve per level
upwards (``w_i = max(d_model / 2^(L-1-i), MIN_WIDTH)``), ``layers`` is the number of blocks per
level, ``dropout`` the bottleneck dropout; ``heads``, ``kernel`` and ``fusion_layers`` do not
apply. ``levels`` (default 4: 128^3 -> a 16^3 bottleneck) is a builder argument only.

Which training methods can drive this model is listed in :data:`SUPPORTED_METHODS`;
:func:`check_method_support` raises a clear error for the others (called by ``train_job`` before
anything is built, and usable by config validation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmrepro.data.loader import Batch
from mmrepro.data.schema import DatasetSchema, TaskSpec
from mmrepro.models.output import ModelOutput
from mmrepro.spec import MethodPlan

#: Name of this backbone in metrics.json and accepted as ``model.backbone`` for segmentation.
BACKBONE = "unet3d"
#: The segmentation models a config may name: this 3-D U-Net (our own) and CGGM's 2-D DeepLabv3+
#: (:mod:`mmrepro.models.deeplab`); any other ``model.backbone`` of a segmentation task gets the U-Net.
SEGMENTATION_BACKBONES = ("unet3d", "deeplab2d")
#: Narrowest level of the U-Net, whatever ``d_model`` asks for: with 4 full-resolution channels the
#: tiny overfit problem of the tests learned the small enhancing-tumour class several times slower.
MIN_WIDTH = 8
DEFAULT_LEVELS = 4

#: Plug-ins that work with the segmentation models, per method family, and why the others do not:
#: ``joint`` needs nothing; ``greedy`` (``speed="encoder"``) reads only ``model.encoders[m]``'s
#: gradients (``speed="conditional"`` needs crossmodal blocks and says so at setup); ``cggm``
#: trains per-modality segmentation probes, as CGGM's BraTS code does. ``ogm_ge`` splits a linear
#: head by modality block, the utilisation probes predict one label per sample, ``pmr`` builds
#: per-class prototypes of per-sample labels, ``agm`` and ``mslr`` score unimodal outputs with
#: per-sample class scores: none has a per-voxel counterpart yet. PEFT transforms target the
#: sequence encoders' layers, and test-time adapters predict per sample.
SUPPORTED_METHODS: dict[str, tuple[str, ...]] = {
    "transform": ("full_finetune",),
    "hook": ("joint", "greedy", "cggm"),
    "adapter": ("source_only",),
}


def check_method_support(task: TaskSpec | str, plan: MethodPlan) -> None:
    """Raise ``ValueError`` if ``plan`` names a plug-in this model cannot be trained with; sequence
    tasks always pass."""
    task_type = task if isinstance(task, str) else task.type
    if task_type != "segmentation":
        return
    for family, allowed in SUPPORTED_METHODS.items():
        name = getattr(plan, family)
        if name not in allowed:
            raise ValueError(f"{family} {name!r} is not supported for segmentation (models {list(SEGMENTATION_BACKBONES)}); "
                             f"supported {family}s: {list(allowed)}")


def unet_widths(d_model: int, levels: int) -> tuple[int, ...]:
    """Channel widths per level: ``d_model`` at the bottleneck, halving upwards, at least :data:`MIN_WIDTH`."""
    if levels < 2:
        raise ValueError(f"unet3d needs at least 2 levels, got {levels}")
    return tuple(max(d_model // 2 ** (levels - 1 - i), MIN_WIDTH) for i in range(levels))


class ConvBlock(nn.Sequential):
    """Two (3x3x3 conv -> instance norm -> leaky ReLU); the first conv may stride (downsampling)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__(
            nn.Conv3d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
            nn.InstanceNorm3d(out_ch, affine=True), nn.LeakyReLU(0.01, inplace=True),
            nn.Conv3d(out_ch, out_ch, 3, padding=1, bias=False),
            nn.InstanceNorm3d(out_ch, affine=True), nn.LeakyReLU(0.01, inplace=True),
        )


def _stage(in_ch: int, out_ch: int, stride: int, blocks: int) -> nn.Sequential:
    return nn.Sequential(ConvBlock(in_ch, out_ch, stride), *(ConvBlock(out_ch, out_ch) for _ in range(blocks - 1)))


class VolumeEncoder(nn.Module):
    """U-Net encoder of one modality: returns its feature map at every level, finest first."""

    def __init__(self, in_channels: int, widths: Sequence[int], blocks: int = 1):
        super().__init__()
        chans = [in_channels, *widths]
        self.stages = nn.ModuleList(_stage(chans[i], chans[i + 1], 1 if i == 0 else 2, blocks)
                                    for i in range(len(widths)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out


class ScaleFusion(nn.Module):
    """Concatenate the modalities' maps of one level and mix them with a 1x1x1 conv (+ norm, act)."""

    def __init__(self, n_modalities: int, width: int):
        super().__init__()
        self.mix = nn.Sequential(nn.Conv3d(n_modalities * width, width, 1, bias=False),
                                 nn.InstanceNorm3d(width, affine=True), nn.LeakyReLU(0.01, inplace=True))

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.mix(torch.cat(list(maps), dim=1))


class Decoder(nn.Module):
    """U-Net decoder: per level, 2x transposed conv, concat with the fused skip, a block."""

    def __init__(self, widths: Sequence[int], blocks: int = 1):
        super().__init__()
        levels = len(widths)
        self.up = nn.ModuleList(nn.ConvTranspose3d(widths[i + 1], widths[i], 2, stride=2) for i in range(levels - 1))
        self.blocks = nn.ModuleList(_stage(2 * widths[i], widths[i], 1, blocks) for i in range(levels - 1))

    def forward(self, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        h = skips[-1]
        for i in reversed(range(len(skips) - 1)):
            h = self.blocks[i](torch.cat([self.up[i](h), skips[i]], dim=1))
        return h


class ModalityDecoder(nn.Module):
    """CGGM's classifier for one modality: a :class:`Decoder` of the model's design over that
    modality's level maps (finest first), a 1x1x1 ``out`` convolution, logits cropped to ``size``."""

    def __init__(self, widths: Sequence[int], blocks: int, num_classes: int):
        super().__init__()
        self.decoder = Decoder(widths, blocks)
        self.out = nn.Conv3d(widths[0], num_classes, 1)

    def forward(self, levels: list[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        logits = self.out(self.decoder(levels))
        return logits[..., : size[0], : size[1], : size[2]]


class SegmentationModel(nn.Module):
    """Per-modality 3-D encoders, fusion at every scale, a shared decoder; per-voxel logits.

    Exposes what the shared loop and the hooks read: ``names``, ``encoders`` (``ModuleDict``,
    one per modality), ``fusion`` (``ModuleList``, one per level), ``decoder``, ``head`` (the
    1x1x1 classifier conv), ``task_type = "segmentation"`` and :meth:`new_probe`.
    """

    backbone = BACKBONE

    def __init__(self, names: Sequence[str], in_channels: int, num_classes: int, widths: Sequence[int],
                 blocks: int = 1, dropout: float = 0.0):
        super().__init__()
        self.names = list(names)
        self.widths = tuple(widths)
        self.encoders = nn.ModuleDict({m: VolumeEncoder(in_channels, widths, blocks) for m in self.names})
        self.fusion = nn.ModuleList(ScaleFusion(len(self.names), w) for w in widths)
        self.dropout = nn.Dropout3d(dropout)
        self.decoder = Decoder(widths, blocks)
        self.head = nn.Conv3d(widths[0], num_classes, 1)
        self.task_type = "segmentation"
        self.multiple = 2 ** (len(widths) - 1)
        self.blocks, self.num_classes = blocks, num_classes

    def new_probe(self) -> ModalityDecoder:
        """A freshly initialised decoder of this model's design for one modality (CGGM's classifier)."""
        return ModalityDecoder(self.widths, self.blocks, self.num_classes)

    def inputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Each modality's ``(B, C, D, H, W)`` volume, zeroed where ``batch.present`` is False."""
        columns = list(batch.x)  # the loader orders ``present``'s columns as ``x``
        out = {}
        for m in self.names:
            x = batch.x[m]
            if x.dim() != 5:
                raise ValueError(f"unet3d: modality {m!r} must be a (B, C, D, H, W) volume, got shape {tuple(x.shape)}")
            out[m] = x * batch.present[:, columns.index(m)].to(x.dtype).view(-1, 1, 1, 1, 1)
        return out

    def forward(self, batch: Batch) -> ModelOutput:
        x = self.inputs(batch)
        size = x[self.names[0]].shape[2:]
        pad = [(-s) % self.multiple for s in size]
        pads = [p for s in reversed(pad) for p in (0, s)]  # F.pad: last axis first
        levels = {m: self.encoders[m](F.pad(v, pads) if any(pad) else v) for m, v in x.items()}
        fused = [f([levels[m][i] for m in self.names]) for i, f in enumerate(self.fusion)]
        fused[-1] = self.dropout(fused[-1])
        logits = self.head(self.decoder(fused))[..., : size[0], : size[1], : size[2]]
        bottleneck = {m: levels[m][-1] for m in self.names}
        return ModelOutput(pred=logits, fused=fused[-1].mean(dim=(2, 3, 4)),
                           tokens={m: h.flatten(2).transpose(1, 2) for m, h in bottleneck.items()},
                           features={m: h.mean(dim=(2, 3, 4)) for m, h in bottleneck.items()})


def unet3d(schema: DatasetSchema, task: TaskSpec, *, d_model: int, layers: int, dropout: float,
           modalities: list[str] | None = None, levels: int = DEFAULT_LEVELS) -> SegmentationModel:
    """The segmentation model for a dataset of volumes (see the module docstring for the sizes)."""
    if task.type != "segmentation":
        raise ValueError(f"unet3d predicts per-voxel classes; task {task.name!r} is {task.type}")
    names = modalities or schema.modality_names
    specs = [schema.modality(m) for m in names]
    bad = [s.name for s in specs if s.is_sequence or len(s.shape) != 4]
    if bad:
        raise ValueError(f"unet3d needs volume modalities of shape (C, D, H, W); not volumes: {bad}")
    shapes = {s.shape for s in specs}
    if len(shapes) != 1:
        raise ValueError(f"unet3d: all modalities must share one shape, got {sorted(shapes)}")
    shape = specs[0].shape
    if tuple(shape[1:]) != tuple(task.shape):
        raise ValueError(f"unet3d: volumes {shape[1:]} and label maps {task.shape} differ in spatial shape")
    bottleneck = [math.ceil(s / 2 ** (levels - 1)) for s in shape[1:]]
    if math.prod(bottleneck) < 2:
        raise ValueError(f"unet3d: {levels} levels shrink {shape[1:]} to a single voxel (instance norm needs "
                         f"more); use fewer levels or larger volumes")
    return SegmentationModel(names, shape[0], task.num_classes, unet_widths(d_model, levels), blocks=layers,
                             dropout=dropout)
