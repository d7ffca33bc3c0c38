"""CGGM's BraTS model: 2-D DeepLabv3+ with one ResNet + ASPP branch per MRI sequence (``deeplab2d``).

What CGGM's code builds (``zrguo/CGGM`` at ``d7890a8``, ``models/segmodel.py`` and
``src/segtrain.py``; read, not copied), and what this module builds the same way:

* **Branch** per modality (:class:`Branch`): a ResNet on the one-channel slice (7x7 stride-2 stem,
  batch norm, ReLU, 3x3 stride-2 max pool, four stages of residual blocks at widths ``w, 2w, 4w,
  8w`` times the block's expansion) at output stride 16: stages 1-4 stride 1, 2, 2, 1; the last
  stage dilated by 2 and built as a "multi-grid" unit of three blocks with dilations 2, 4, 8
  whatever the depth. The code uses ResNet-101 (bottleneck blocks 3, 4, 23, 3; ``w = 64``), no
  pretrained weights. The first stage's output is the branch's low-level map (stride 4).
  Then ASPP: a 1x1 branch, three 3x3 branches dilated 2, 4 and 6 (the code's rates at output stride
  16; the DeepLab paper's are 6, 12, 18), a global-pooling branch, all ``d`` wide (256 in the
  code) with batch norm and ReLU, concatenated, projected back to ``d`` (1x1 conv, batch norm,
  ReLU, dropout 0.5).
* **Fusion and decoder** (:class:`DecoderBody` + ``head``): the DeepLabv3+ decoder over the
  **concatenated** branches: the M low-level maps (concatenated) go through a 1x1 conv to 48
  channels (batch norm, ReLU); the M ASPP outputs (concatenated) are bilinearly upsampled
  (``align_corners=True``) to the low-level size and concatenated with them; then 3x3 conv to
  ``d``, batch norm, ReLU, dropout 0.5, 3x3 conv, batch norm, ReLU, dropout 0.1, and the final 1x1
  conv to the K classes (``head``, CGGM's ``decoder.last_conv.7``: the weight its direction term
  compares). Logits are upsampled bilinearly (``align_corners=True``) to the slice size.
* **CGGM's classifiers** (:meth:`DeepLab2D.new_probe`): one decoder of the same design per modality,
  reading that modality's detached low-level map and ASPP output (``input_heads=1`` in the code).
* Initialisation as the code: ResNet convs normal with std ``sqrt(2 / (k*k*out))`` (He, fan-out),
  ASPP and decoder convs He (fan-in) normal, batch-norm weight 1 and bias 0.

Why our own blocks and not torchvision's: torchvision's ``Bottleneck``/``BasicBlock`` and
``ASPP`` have exactly this layout, but the only torchvision wheel PyPI offers for torch 2.13 is the
CUDA build, whose compiled ops need ``libc10_cuda.so``: with this project's CPU torch
``import torchvision`` fails. The blocks below are the standard ones (stride on the 3x3 conv, as
torchvision and the code), written to the same shapes; ``resnet=101, width=64, d_model=256`` gives
the code's parameter count per branch.

Model config (:func:`deeplab2d`): ``d_model`` = ASPP/decoder width ``d`` (256 in the code),
``resnet`` = depth (18, 34: basic blocks; 50, 101: bottlenecks), ``resnet_width`` = ``w``.
``layers``, ``heads``, ``kernel``, ``fusion_layers`` and ``dropout`` do not apply (the dropouts
are the code's fixed 0.5 / 0.1).

Input: each modality a slice batch ``(B, 1, H, W)`` (training: :class:`mmrepro.data.loader.SliceSampling`
draws them from the volumes) or whole volumes ``(B, 1, H, W, D)`` (evaluation): a volume is cut
into its ``D`` slices along the last axis, which go through the network as one batch of ``B * D``
slices, and the slice logits are stacked back into ``(B, K, H, W, D)``, so the loss and the Dice
are computed on whole volumes. ``tokens[m]`` (the ASPP output as ``(N, h*w, d)``) and
``features[m]`` / ``fused`` (averaged over positions) are per slice: ``N = B`` for slices,
``B * D`` for volumes. A modality absent for a sample (``batch.present`` False) has its input
zeroed, as the 3-D model.
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

BACKBONE = "deeplab2d"
#: ResNet depth -> (block, blocks in stages 1-3); stage 4 is always the three-block multi-grid unit.
DEPTHS = {18: ("basic", (2, 2, 2)), 34: ("basic", (3, 4, 6)), 50: ("bottleneck", (3, 4, 6)),
          101: ("bottleneck", (3, 4, 23))}
MULTI_GRID = (1, 2, 4)  # times the last stage's dilation 2
ASPP_RATES = (2, 4, 6)  # the code's rates at output stride 16
LOW_LEVEL_OUT = 48


def _bn_relu(ch: int) -> list[nn.Module]:
    return [nn.BatchNorm2d(ch), nn.ReLU(inplace=True)]


class _Residual(nn.Module):
    """A residual block: ``relu(body(x) + skip(x))``, ``skip`` the identity or a 1x1 projection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.downsample is None else self.downsample(x)
        return F.relu(self.body(x) + skip)


class BasicBlock(_Residual):
    """Two 3x3 convs with batch norm (ResNet-18/34); stride on the first, dilation on both."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(inplanes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False), *_bn_relu(planes),
            nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False), nn.BatchNorm2d(planes))
        self.downsample = downsample


class Bottleneck(_Residual):
    """1x1 reduce, 3x3 (stride, dilation), 1x1 expand by 4, batch norm after each (ResNet-50/101)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(inplanes, planes, 1, bias=False), *_bn_relu(planes),
            nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False), *_bn_relu(planes),
            nn.Conv2d(planes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4))
        self.downsample = downsample


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
    """ResNet at output stride 16 with a multi-grid last stage; returns ``(low_level, deep)``."""

    def __init__(self, in_channels: int, depth: int, width: int):
        super().__init__()
        kind, counts = DEPTHS[depth]
        block = BLOCKS[kind]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 7, 2, padding=3, bias=False), *_bn_relu(width),
                                  nn.MaxPool2d(3, 2, padding=1))
        self.inplanes = width
        plan = [(counts[0], 1, (1,)), (counts[1], 2, (1,)), (counts[2], 2, (1,)), (len(MULTI_GRID), 1, MULTI_GRID)]
        stages = []
        for i, (n, stride, grid) in enumerate(plan):
            base = 2 if i == 3 else 1  # the last stage trades its stride for dilation 2
            dilations = [base * g for g in grid] if len(grid) == n else [base] * n
            stages.append(self._stage(block, width * 2 ** i, stride, dilations))
        self.stages = nn.ModuleList(stages)
        self.low_channels = width * block.expansion
        self.out_channels = width * 8 * block.expansion
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _stage(self, block, planes: int, stride: int, dilations: Sequence[int]) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, dilations[0], downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, d) for d in dilations[1:]]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stages[0](self.stem(x))
        low = x
        for stage in self.stages[1:]:
            x = stage(x)
        return low, x


def _he_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three dilated 3x3 and a global-pool branch, projected to ``width``."""

    def __init__(self, in_channels: int, width: int, rates: Sequence[int] = ASPP_RATES):
        super().__init__()
        self.branches = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(in_channels, width, 1, bias=False), *_bn_relu(width))]
            + [nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=r, dilation=r, bias=False), *_bn_relu(width))
               for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, width, 1, bias=False), *_bn_relu(width))
        self.project = nn.Sequential(nn.Conv2d(width * (len(rates) + 2), width, 1, bias=False), *_bn_relu(width),
                                     nn.Dropout(0.5))
        _he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = [b(x) for b in self.branches]
        maps.append(self.pool(x).expand(-1, -1, *x.shape[2:]))  # upsampling a 1x1 map is a broadcast
        return self.project(torch.cat(maps, dim=1))


class Branch(nn.Module):
    """One modality's encoder: ResNet then ASPP; returns ``[low_level, aspp]`` (finest first)."""

    def __init__(self, in_channels: int, depth: int, width: int, d_model: int):
        super().__init__()
        self.resnet = ResNet(in_channels, depth, width)
        self.aspp = ASPP(self.resnet.out_channels, d_model)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        low, deep = self.resnet(x)
        return [low, self.aspp(deep)]


class DecoderBody(nn.Module):
    """The DeepLabv3+ decoder up to (not including) its final 1x1 conv, at the low-level resolution."""

    def __init__(self, low_channels: int, deep_channels: int, width: int):
        super().__init__()
        self.low = nn.Sequential(nn.Conv2d(low_channels, LOW_LEVEL_OUT, 1, bias=False), *_bn_relu(LOW_LEVEL_OUT))
        self.body = nn.Sequential(
            nn.Conv2d(deep_channels + LOW_LEVEL_OUT, width, 3, padding=1, bias=False), *_bn_relu(width),
            nn.Dropout(0.5), nn.Conv2d(width, width, 3, padding=1, bias=False), *_bn_relu(width), nn.Dropout(0.1))
        _he_init(self)

    def forward(self, low: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
        low = self.low(low)
        deep = F.interpolate(deep, size=low.shape[2:], mode="bilinear", align_corners=True)
        return self.body(torch.cat([deep, low], dim=1))


def slice_logits(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Slice logits ``(N, K, h, w)`` upsampled to the label size: ``(H, W)`` for slices, or ``(H, W, D)``
    for volumes, then the ``N = B * D`` slices are stacked back into ``(B, K, H, W, D)``."""
    logits = F.interpolate(logits, size=tuple(size[:2]), mode="bilinear", align_corners=True)
    if len(size) == 2:
        return logits
    depth = size[2]
    return logits.unflatten(0, (-1, depth)).permute(0, 2, 3, 4, 1)


class SliceProbe(nn.Module):
    """CGGM's classifier for one modality: a decoder of the model's design on that modality's maps."""

    def __init__(self, low_channels: int, width: int, num_classes: int):
        super().__init__()
        self.decoder = DecoderBody(low_channels, width, width)
        self.out = nn.Conv2d(width, num_classes, 1)
        _he_init(self.out)

    def forward(self, levels: list[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        return slice_logits(self.out(self.decoder(*levels)), size)


class DeepLab2D(nn.Module):
    """Per-modality ResNet + ASPP branches, the DeepLabv3+ decoder over their concatenation, ``head``.

    Exposes what the loop and the hooks read: ``names``, ``encoders`` (one :class:`Branch` per
    modality), ``decoder``, ``head`` (the final 1x1 conv), ``task_type`` and :meth:`new_probe`.
    """

    backbone = BACKBONE

    def __init__(self, names: Sequence[str], in_channels: int, num_classes: int, *, depth: int, width: int,
                 d_model: int):
        super().__init__()
        self.names = list(names)
        self.encoders = nn.ModuleDict({m: Branch(in_channels, depth, width, d_model) for m in self.names})
        self.low_channels = self.encoders[self.names[0]].resnet.low_channels
        self.width, self.num_classes = d_model, num_classes
        self.decoder = DecoderBody(len(self.names) * self.low_channels, len(self.names) * d_model, d_model)
        self.head = nn.Conv2d(d_model, num_classes, 1)
        _he_init(self.head)
        self.task_type = "segmentation"

    def new_probe(self) -> SliceProbe:
        """A freshly initialised decoder of this model's design for one modality (CGGM's classifier)."""
        return SliceProbe(self.low_channels, self.width, self.num_classes)

    def inputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Each modality as a batch of slices ``(N, C, H, W)`` (volumes cut along their last axis),
        zeroed where ``batch.present`` is False."""
        columns = list(batch.x)
        out = {}
        for m in self.names:
            x = batch.x[m]
            if x.dim() not in (4, 5):
                raise ValueError(f"{BACKBONE}: modality {m!r} must be slices (B, C, H, W) or volumes (B, C, H, W, D), "
                                 f"got shape {tuple(x.shape)}")
            x = x * batch.present[:, columns.index(m)].to(x.dtype).view(-1, *[1] * (x.dim() - 1))
            out[m] = x.permute(0, 4, 1, 2, 3).flatten(0, 1) if x.dim() == 5 else x
        return out

    def forward(self, batch: Batch) -> ModelOutput:
        first = batch.x[self.names[0]]
        x = self.inputs(batch)
        levels = {m: self.encoders[m](v) for m, v in x.items()}
        low = torch.cat([levels[m][0] for m in self.names], dim=1)
        deep = torch.cat([levels[m][1] for m in self.names], dim=1)
        hidden = self.decoder(low, deep)
        logits = slice_logits(self.head(hidden), first.shape[2:])
        aspp = {m: levels[m][1] for m in self.names}
        return ModelOutput(pred=logits, fused=hidden.mean(dim=(2, 3)),
                           tokens={m: h.flatten(2).transpose(1, 2) for m, h in aspp.items()},
                           features={m: h.mean(dim=(2, 3)) for m, h in aspp.items()})


def deeplab2d(schema: DatasetSchema, task: TaskSpec, *, d_model: int, resnet: int = 101, resnet_width: int = 64,
              modalities: list[str] | None = None) -> DeepLab2D:
    """CGGM's BraTS model for a dataset of volumes (see the module docstring for the sizes)."""
    if task.type != "segmentation":
        raise ValueError(f"{BACKBONE} predicts per-pixel classes; task {task.name!r} is {task.type}")
    if resnet not in DEPTHS:
        raise ValueError(f"{BACKBONE}: resnet depth must be one of {sorted(DEPTHS)}, got {resnet}")
    names = modalities or schema.modality_names
    specs = [schema.modality(m) for m in names]
    bad = [s.name for s in specs if s.is_sequence or len(s.shape) not in (3, 4)]
    if bad:
        raise ValueError(f"{BACKBONE} needs image or volume modalities (C, H, W[, D]); not those: {bad}")
    channels = {s.shape[0] for s in specs}
    if len(channels) != 1:
        raise ValueError(f"{BACKBONE}: all modalities must have one channel count, got {sorted(channels)}")
    if min(math.prod(s.shape[1:3]) for s in specs) < 4:
        raise ValueError(f"{BACKBONE}: slices of {specs[0].shape[1:3]} are too small for a stride-16 network")
    return DeepLab2D(names, channels.pop(), task.num_classes, depth=resnet, width=resnet_width, d_model=d_model)
