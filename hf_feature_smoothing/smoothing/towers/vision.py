"""Stand-alone image encoders (DINOv2, CLIP/SigLIP vision models, ViT): `(B, 3, H, W)` pixels; the feature is the
pooled output (the normalised CLS token for DINOv2 and CLIP). Used for certification, attacks and booster training
on real encoders without a language model."""

import torch
from torch import nn

from ...utils.deprecation import deprecated_aliases
from . import register_tower_family
from .base import BoosterGeometry, pixel_conv
from .inputs import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageInputs,
)
from .llava import LlavaTowerFamily


@register_tower_family
class VisionEncoderFamily(LlavaTowerFamily):
    model_types = ("dinov2", "vit", "clip_vision_model", "siglip_vision_model")

    # the defaults of each model type's transformers image processor (BitImageProcessor for DINOv2, ViT, CLIP, SigLIP)
    default_stats = {
        "dinov2": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
        "vit": (IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD),
        "clip_vision_model": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
        "siglip_vision_model": (IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD),
    }

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

    def _module_name(self, suffix: str) -> str:
        """Name of the model's module `suffix` (CLIP / SigLIP: under `vision_model.` before transformers 5)."""
        return next(n for n, _ in self.model.named_modules() if n == suffix or n.endswith("." + suffix))

    def booster_target(self) -> str:
        return "layernorm" if self.model.config.model_type in ("dinov2", "vit") else self._module_name("post_layernorm")

    def booster_feature_dim(self) -> int:
        return int(self.model.config.hidden_size)

    def booster_geometry(self) -> BoosterGeometry:
        name, conv = pixel_conv(self.model)
        config, token_target = self.model.config, None
        if config.model_type == "clip_vision_model":  # pools before its final norm: mix the last layer's tokens
            token_target = f"{self._module_name('encoder.layers')}.{config.num_hidden_layers - 1}"
        return BoosterGeometry(pixel_entry=name, grid_source=name, patch_size=int(conv.stride[0]),
                               token_target=token_target)

    def run(self, inputs: ImageInputs) -> None:
        raise NotImplementedError("Stand-alone encoders are read through `encode`.")

    def encode(self, inputs: ImageInputs) -> list[torch.Tensor]:
        if self.config.smoothed_features != "vision":  # checked per call: the config is live
            raise ValueError(f"`smoothed_features={self.config.smoothed_features!r}` smooths an MLLM projector's "
                             f"outputs, but a stand-alone `{self.model.config.model_type}` encoder has no projector; "
                             "use `smoothed_features='vision'` (its pooled feature).")
        pooled = self.model(pixel_values=inputs.pixel_values).pooler_output.flatten(1)
        self.primary_channels = pooled.shape[-1]  # one pooled token per image
        return [pooled]

# names of 0.1.0 (the tower integration was called an adapter), kept as aliases that warn once
__getattr__ = deprecated_aliases(globals(), {"VisionEncoderAdapter": "VisionEncoderFamily"})
