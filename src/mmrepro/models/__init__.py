"""Models: per-modality encoders, fusion backbones and the shared multimodal model."""

from mmrepro.models.build import build_model
from mmrepro.models.multimodal import MultimodalModel
from mmrepro.models.output import ModelOutput

__all__ = ["ModelOutput", "MultimodalModel", "build_model"]
