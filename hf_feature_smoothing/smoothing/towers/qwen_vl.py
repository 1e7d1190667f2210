"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: patch-flattened pixels `(Σ t·h·w, C·T·p·p)` plus `image_grid_thw`.

A still image is stored as `T = temporal_patch_size` identical frames, so the image tensor keeps one frame and noise
is expanded over the temporal copies. The feature site is `visual.merger` (and, for Qwen3-VL, every
`deepstack_merger_list` entry, whose features bypass the merger and enter the first LM layers)."""

import torch
from torch import nn

from ...utils.deprecation import deprecated_aliases
from ...utils.logging import get_logger
from ...utils.validation import check_channels
from . import register_tower_family
from .base import BoosterGeometry, TowerFamily, unwrap_tuner_layer
from .inputs import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, ImageInputs, center_crop, pil_to_tensor
from .processor import qwen_pixels


logger = get_logger(__name__)


def _window_order(visual: nn.Module, grid_thw: torch.Tensor) -> torch.Tensor:
    """Qwen2.5-VL's merge-unit permutation (its blocks, and so the merger input, run in window order)."""
    from transformers.vision_utils import get_vision_window_index

    index, _ = get_vision_window_index(grid_thw, visual.spatial_merge_size, visual.window_size, visual.patch_size)
    return index


@register_tower_family
class QwenVLTowerFamily(TowerFamily):
    model_types = ("qwen2_vl", "qwen2_5_vl")

    @property
    def inner(self) -> nn.Module:
        return self.model.model if hasattr(self.model, "lm_head") else self.model

    def tower(self) -> nn.Module:
        return self.inner.visual

    def site_modules(self) -> list[nn.Module]:
        return [unwrap_tuner_layer(self.inner.visual.merger)]

    def booster_target(self) -> str:
        return "visual.merger"

    def booster_feature_dim(self) -> int:
        # the merger starts with a norm over the per-patch width (LayerNorm or RMSNorm)
        merger = unwrap_tuner_layer(self.inner.visual.merger)
        return next(m.weight.shape[0] for m in merger.modules() if getattr(m, "weight", None) is not None)

    def booster_geometry(self) -> BoosterGeometry:
        channels, temporal, patch = self._patch
        windowed = self.model.config.model_type.removeprefix("smoothed_") == "qwen2_5_vl"
        return BoosterGeometry(pixel_entry="visual.patch_embed", grid_source="visual", patch_size=patch,
                               patch_flattened=True, merge_size=self.inner.config.vision_config.spatial_merge_size,
                               temporal_patch_size=temporal, channels=channels,
                               site_order=_window_order if windowed else None)

    @property
    def _patch(self) -> tuple[int, int, int]:
        vision = self.inner.config.vision_config
        channels = getattr(vision, "in_channels", None) or getattr(vision, "in_chans", 3)
        return channels, vision.temporal_patch_size, vision.patch_size

    def check_channels(self, name: str, pixel_values: torch.Tensor) -> None:
        """Patch-flattened rows hold channels × temporal_patch_size × patch_size² values: the channels of a row width
        that is a multiple of one channel's patch, else a width error."""
        channels, temporal, patch = self._patch
        width, per_channel = pixel_values.shape[1], temporal * patch * patch
        if width % per_channel:
            raise ValueError(f"`{name}` rows have {width} values but this tower's patches have {channels} × {temporal} "
                             f"× {patch}² = {channels * per_channel}; pass the processor's `pixel_values` for this model.")
        check_channels(name, width // per_channel, channels, tuple(pixel_values.shape))

    def inputs_from_call(self, args: tuple, kwargs: dict) -> ImageInputs:
        pixel_values = args[0] if args else kwargs["hidden_states"]
        grid = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]
        return ImageInputs(pixel_values, grid)

    def replace_call_pixels(self, args, kwargs, pixel_values):
        if args:
            return (pixel_values, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": pixel_values}

    def to_image(self, inputs: ImageInputs) -> torch.Tensor:
        channels, temporal, patch = self._patch
        frames = inputs.pixel_values.float().view(-1, channels, temporal, patch, patch)
        if temporal > 1 and not torch.equal(frames[:, :, :1].expand_as(frames), frames):
            raise ValueError(
                "`pixel_values` hold video (temporal copies differ); feature smoothing supports still images only."
            )
        mean, std = self._stats(frames, (channels, 1, 1))
        return frames[:, :, 0] * std + mean

    def from_image(self, image: torch.Tensor, inputs: ImageInputs) -> torch.Tensor:
        channels, temporal, patch = self._patch
        mean, std = self._stats(image, (channels, 1, 1))
        frames = ((image - mean) / std).unsqueeze(2).expand(-1, channels, temporal, patch, patch)
        return frames.reshape(image.shape[0], -1).to(inputs.pixel_values.dtype)

    def repeat(self, inputs: ImageInputs, copies: int) -> ImageInputs:
        return ImageInputs(inputs.pixel_values, inputs.image_grid_thw.repeat(copies, 1))

    def default_image_size(self) -> int:
        return 224

    def preprocess(self, images: list, image_size: int | None = None) -> ImageInputs:
        """PIL images → patch-flattened inputs in the processor's row order (merge windows of m×m patches): at the
        grid the model's processor gives (`smart_resize` with its min/max pixels, from `config.image_processor`),
        or, with `image_size` (or without processor settings), centre-cropped to a square whose side is
        `image_size` rounded to a multiple of patch × merge size."""
        channels, temporal, patch = self._patch
        merge = self.inner.config.vision_config.spatial_merge_size
        unit = patch * merge
        geometry = self.config.image_processor
        patches, grids = [], []
        for img in images:
            if image_size is None and geometry:
                x = qwen_pixels(img, geometry, patch, merge)
            else:
                side = max(unit, round((image_size or self.default_image_size()) / unit) * unit)
                if image_size is not None and side != image_size:
                    logger.warning_once(f"`image_size`={image_size}: Qwen-VL images are cut into merge windows of "
                                        f"{unit} px, so they are centre-cropped to {side}×{side} (each certificate's "
                                        f"`resolution`); pass a multiple of {unit} to certify at the size you chose.")
                x = pil_to_tensor(center_crop(img, side, side))
            gh, gw = x.shape[1] // patch, x.shape[2] // patch
            x = x.view(channels, gh // merge, merge, patch, gw // merge, merge, patch).permute(1, 4, 2, 5, 0, 3, 6)
            patches.append(x.reshape(-1, channels, patch, patch))
            grids.append([1, gh, gw])
        image = torch.cat(patches)
        like = ImageInputs(torch.zeros(0, channels * temporal * patch * patch), torch.tensor(grids))
        return like.with_pixels(self.from_image(image, like))

    def split(self, inputs: ImageInputs) -> list[ImageInputs]:
        sizes = inputs.image_grid_thw.prod(-1).tolist()
        rows = inputs.pixel_values.split(sizes)
        return [ImageInputs(pv, grid[None]) for pv, grid in zip(rows, inputs.image_grid_thw)]

    def rows_per_image(self, inputs: ImageInputs, num_rows: int) -> list[int]:
        sizes = inputs.image_grid_thw.prod(-1)
        return (sizes * num_rows // sizes.sum()).tolist()

    def run(self, inputs: ImageInputs) -> None:
        self.inner.get_image_features(pixel_values=inputs.pixel_values, image_grid_thw=inputs.image_grid_thw)


@register_tower_family
class Qwen3VLTowerAdapter(QwenVLTowerFamily):
    model_types = ("qwen3_vl",)
    default_stats = (IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD)

    def site_modules(self) -> list[nn.Module]:
        visual = self.inner.visual
        return [*visual.deepstack_merger_list, unwrap_tuner_layer(visual.merger)]

# names of 0.1.0 (the tower integration was called an adapter), kept as aliases that warn once
__getattr__ = deprecated_aliases(globals(), {"QwenVLTowerAdapter": "QwenVLTowerFamily"})
