"""Stand-alone image encoders (DINOv2, CLIP/SigLIP vision models, ViT): `(B, 3, H, W)` pixels; the feature is the
pooled output (the normalised CLS token for DINOv2 and CLIP). Used for certification, attacks and booster training
on real encoders without a language model."""

import torch
from torch import nn

from . import register_tower_adapter
from .base import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageInputs,
)
from .llava import LlavaTowerAdapter


@register_tower_adapter
class VisionEncoderAdapter(LlavaTowerAdapter):
    model_types = ("dinov2", "vit", "clip_vision_model", "siglip_vision_model")

    # the defaults of each model type's transformers image processor (BitImageProcessor for DINOv2, ViT, CLIP, SigLIP)
    _DEFAULT_STATS = {
        "dinov2": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
        "vit": (IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD),
        "clip_vision_model": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
        "siglip_vision_model": (IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD),
    }

    @classmethod
    def family_default_stats(cls, model_type: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return cls._DEFAULT_STATS[model_type]

    @property
    def default_image_mean(self) -> tuple[float, float, float]:
        return self._DEFAULT_STATS[self.model.config.model_type][0]

    @property
    def default_image_std(self) -> tuple[float, float, float]:
        return self._DEFAULT_STATS[self.model.config.model_type][1]

    @property
    def inner(self) -> nn.Module:
        return self.model

    def default_image_size(self) -> int:
        return min(224, super().default_image_size())  # DINOv2 configs say 518; 224 is the usual, 5× cheaper input

    def tower(self) -> nn.Module:
        return self.model

    def site_modules(self) -> list[nn.Module]:
        return []

    booster_position = "after"  # on the final norm: the pooled feature is read from the boosted tokens

    def booster_target(self) -> str:
        return "layernorm" if self.model.config.model_type in ("dinov2", "vit") else "vision_model.post_layernorm"

    def booster_feature_dim(self) -> int:
        return int(self.model.config.hidden_size)

    def run(self, inputs: ImageInputs) -> None:
        raise NotImplementedError("Stand-alone encoders are read through `encode`.")

    def encode(self, inputs: ImageInputs) -> list[torch.Tensor]:
        return [self.model(pixel_values=inputs.pixel_values).pooler_output.flatten(1)]
