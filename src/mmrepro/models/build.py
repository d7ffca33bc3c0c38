"""The one place that knows every model builder: :func:`build_model` picks the backbone's builder
(the shared multimodal model with a fusion, a paper preset, DeepLab or the U-Net). The builders
never import this module back."""

from __future__ import annotations

from torch import nn

from mmrepro.data.schema import DatasetSchema, TaskSpec
from mmrepro.models.deeplab import deeplab2d
from mmrepro.models.encoders import ModalityEncoder
from mmrepro.models.fusion import FUSIONS
from mmrepro.models.multimodal import MultimodalModel, PredictionHead
from mmrepro.models.presets import PRESETS, build_preset
from mmrepro.models.segmentation import SEGMENTATION_BACKBONES, unet3d


def build_model(schema: DatasetSchema, task: TaskSpec, *, backbone: str, d_model: int, layers: int,
                heads: int, kernel: int, dropout: float, fusion_layers: int,
                modalities: list[str] | None = None, dropouts: dict[str, float] | None = None,
                causal: bool | None = None, position_padding: bool = False, resnet: int = 101,
                resnet_width: int = 64) -> nn.Module:
    """One builder for every backbone, as torchvision's model builders: plain arguments in, module out.

    A ``segmentation`` task gets CGGM's 2-D DeepLabv3+ for ``backbone="deeplab2d"``
    (:mod:`mmrepro.models.deeplab`: ``d_model`` = ASPP/decoder width, ``resnet`` depth and
    ``resnet_width``), else the 3-D U-Net of :mod:`mmrepro.models.segmentation` (``d_model`` =
    bottleneck width, ``layers`` = blocks per level, ``dropout``): a study's model config is shared
    by all its datasets, so ``backbone`` may still name a sequence fusion (``late``/``mult``, then
    ignored) or be ``unet3d``; ``heads``, ``kernel`` and ``fusion_layers`` do not apply. A
    segmentation backbone for a sequence task is an error.

    The papers' backbones (``casp_late``, ``casp_early``, ``cggm_msa``, ``cggm_food``,
    ``mplmm_mult``) are built by :func:`mmrepro.models.presets.build_preset` from ``d_model``,
    ``layers``, ``heads``, ``fusion_layers`` and the preset-only ``dropouts`` (per site; missing
    sites take the preset's official value), ``causal`` (None = preset default) and
    ``position_padding``; ``kernel`` and ``dropout`` do not apply to them.
    """
    if task.type == "segmentation":
        if backbone not in SEGMENTATION_BACKBONES and backbone not in FUSIONS and backbone not in PRESETS:
            raise ValueError(f"unknown backbone {backbone!r}; known: {sorted([*FUSIONS, *PRESETS, *SEGMENTATION_BACKBONES])}")
        if backbone == "deeplab2d":
            return deeplab2d(schema, task, d_model=d_model, resnet=resnet, resnet_width=resnet_width,
                             modalities=modalities)
        return unet3d(schema, task, d_model=d_model, layers=layers, dropout=dropout, modalities=modalities)
    if backbone in SEGMENTATION_BACKBONES:
        raise ValueError(f"backbone {backbone!r} is for segmentation tasks; task {task.name!r} is {task.type}")
    names = modalities or schema.modality_names
    if backbone in PRESETS:
        return build_preset(backbone, schema, task, names, d_model=d_model, layers=layers, heads=heads,
                            fusion_layers=fusion_layers, dropouts=dropouts, causal=causal,
                            position_padding=position_padding)
    if backbone not in FUSIONS:
        raise ValueError(f"unknown backbone {backbone!r}; known: {sorted([*FUSIONS, *PRESETS])}")
    encoders = {m: ModalityEncoder(schema.modality(m).dim, schema.modality(m).length, d_model, layers, heads,
                                   kernel, dropout) for m in names}
    fusion = FUSIONS[backbone](names, d_model=d_model, dropout=dropout, heads=heads, layers=fusion_layers)
    out_dim = 1 if task.type == "regression" else task.num_classes
    return MultimodalModel(encoders, fusion, PredictionHead(fusion.out_dim, out_dim, dropout), task)
