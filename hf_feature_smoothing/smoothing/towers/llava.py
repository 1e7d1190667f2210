"""LLaVA: `(B, 3, H, W)` pixels, CLIP-style tower; the LM reads `hidden_states[vision_feature_layer]` through
`multi_modal_projector`, which is therefore the feature site (a hook on the tower output would do nothing)."""

import torch
from torch import nn

from ...utils.deprecation import deprecated_aliases
from . import register_tower_family
from .base import BoosterGeometry, TowerFamily, pixel_conv, unwrap_tuner_layer
from .inputs import ImageInputs


@register_tower_family
class LlavaTowerFamily(TowerFamily):
    model_types = ("llava",)

    @property
    def inner(self) -> nn.Module:
        return self.model.model if hasattr(self.model, "lm_head") else self.model

    def tower(self) -> nn.Module:
        return self.inner.vision_tower

    def site_modules(self) -> list[nn.Module]:
        return [unwrap_tuner_layer(self.inner.multi_modal_projector)]

    def booster_target(self) -> str:
        return "multi_modal_projector"

    def booster_feature_dim(self) -> int:
        return unwrap_tuner_layer(self.inner.multi_modal_projector).linear_1.in_features

    def booster_geometry(self) -> BoosterGeometry:
        name, conv = pixel_conv(self.inner.vision_tower)  # CLIP, SigLIP or DINOv2 towers alike
        entry = f"vision_tower.{name}"
        return BoosterGeometry(pixel_entry=entry, grid_source=entry, patch_size=int(conv.stride[0]))

    def inputs_from_call(self, args: tuple, kwargs: dict) -> ImageInputs:
        return ImageInputs(args[0] if args else kwargs["pixel_values"])

    def replace_call_pixels(self, args, kwargs, pixel_values):
        if args:
            return (pixel_values, *args[1:]), kwargs
        return args, {**kwargs, "pixel_values": pixel_values}

    def to_image(self, inputs: ImageInputs) -> torch.Tensor:
        mean, std = self._stats(inputs.pixel_values, (3, 1, 1))
        return inputs.pixel_values.float() * std + mean

    def from_image(self, image: torch.Tensor, inputs: ImageInputs) -> torch.Tensor:
        mean, std = self._stats(image, (3, 1, 1))
        return ((image - mean) / std).to(inputs.pixel_values.dtype)

    def repeat(self, inputs: ImageInputs, copies: int) -> ImageInputs:
        return inputs

    def split(self, inputs: ImageInputs) -> list[ImageInputs]:
        return [ImageInputs(pv) for pv in inputs.pixel_values.split(1)]

    def rows_per_image(self, inputs: ImageInputs, num_rows: int) -> list[int]:
        return [1] * num_rows

    def run(self, inputs: ImageInputs) -> None:
        config = self.inner.config
        self.inner.get_image_features(
            pixel_values=inputs.pixel_values,
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        )

# names of 0.1.0 (the tower integration was called an adapter), kept as aliases that warn once
__getattr__ = deprecated_aliases(globals(), {"LlavaTowerAdapter": "LlavaTowerFamily"})
