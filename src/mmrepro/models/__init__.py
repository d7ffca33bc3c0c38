"""Models: per-modality encoders, fusion backbones and the shared multimodal model."""

from mmrepro.models.multimodal import ModelOutput, MultimodalModel, build_model

__all__ = ["ModelOutput", "MultimodalModel", "build_model"]
