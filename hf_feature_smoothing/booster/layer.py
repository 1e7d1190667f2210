"""The booster's PEFT tuner layers: the feature mapper around a feature site and the pixel purifier around the module
that first consumes the pixels, both conditioned on the smoothing noise level."""

import contextlib
from collections.abc import Iterator, Sequence

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..smoothing.conditioning import (
    ConditionState,
    NoiseConditioned,
    PixelStats,
    noise_condition,
    restore_noise_condition,
    set_noise_condition,
)
from ..smoothing.towers import BoosterGeometry
from ..utils.deprecation import deprecated_aliases
from .configuration_booster import GSBConfig
from .layout import GridProbe
from .mapper import GSBMapper
from .purifier import GSBPurifier, frames_to_patches, patches_to_frames
from .registration import PARAMETER_PREFIX


class GSBLayer(nn.Module, BaseTunerLayer, NoiseConditioned):
    """
    Common part of the booster's tuner layers, [`~hf_feature_smoothing.smoothing.conditioning.NoiseConditioned`]:
    `noise_level` is the σ the booster is conditioned on (smoothing sets it around every tower pass, see
    [`booster_noise_level`]); at 0 every booster is the identity.
    `pixel_stats` are the processor's (mean, std) that smoothing uses to map pixels to [0, 1].
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: GSBConfig,
                 geometry: BoosterGeometry | None = None):
        super().__init__()
        self.base_layer = base_layer
        self.noise_level = 0.0
        self.pixel_stats: PixelStats | None = None
        self.geometry = geometry
        self.probe: GridProbe | None = None
        self._active_adapter = adapter_name
        self.merged_adapters = []
        self.trained_sigmas: dict[str, tuple[float, ...]] = {}  # per adapter: its config's `sigmas`
        self.update_layer(adapter_name, config)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # the tower reads attributes of the wrapped module (e.g. `patch_embedding.weight`)
            if name == "base_layer" or "base_layer" not in self.__dict__.get("_modules", {}):
                raise
            return getattr(self.base_layer, name)

    def _place(self, module: nn.Module) -> nn.Module:
        weight = next((p for p in self.base_layer.parameters()), None)
        if weight is not None:
            module.to(device=weight.device, dtype=weight.dtype if weight.is_floating_point() else None)
        return module

    def _active(self, container: nn.ModuleDict) -> list[str]:
        if self.disable_adapters:
            return []
        return [n for n in self.active_adapters if n in container]

    def trained_noise_levels(self) -> tuple[float, ...] | None:
        """The σ the active boosters were trained for (their configs' `sigmas`); None when none is active."""
        if self.disable_adapters:
            return None
        levels = {sigma for name in self.active_adapters for sigma in self.trained_sigmas.get(name, ())}
        return tuple(sorted(levels)) or None

    def adapter_parameters(self, adapter_name: str) -> Iterator[nn.Parameter]:
        for name in self.adapter_layer_names:
            container = getattr(self, name)
            if adapter_name in container:
                yield from container[adapter_name].parameters()

    def merge(self, *args, **kwargs) -> None:
        raise NotImplementedError("A booster is a non-linear map: it cannot be merged into the base weights.")

    def unmerge(self, *args, **kwargs) -> None:
        pass

    def __repr__(self) -> str:
        return "fs_booster." + super().__repr__()


class GSBMapperLayer(GSBLayer):
    """PEFT tuner layer: runs `base_layer` on boosted inputs (`position="before"`) or boosts its output (`"after"`)
    with a [`GSBMapper`]. A token-mixing mapper reads each image's patch grid from a probe on the tower."""

    adapter_layer_names = (f"{PARAMETER_PREFIX}mapper",)
    other_param_names = ("position",)

    def update_layer(self, adapter_name: str, config: GSBConfig) -> None:
        if not hasattr(self, "fs_booster_mapper"):
            self.fs_booster_mapper = nn.ModuleDict()
            self.position: dict[str, str] = {}
        mapper = GSBMapper(config.feature_dim, config.hidden_dim, config.mapper_mixing, config.mixing_heads,
                           config.mixing_kernel_size)
        self.fs_booster_mapper[adapter_name] = self._place(mapper)
        self.position[adapter_name] = config.position
        self.trained_sigmas[adapter_name] = tuple(float(sigma) for sigma in config.sigmas)
        if config.mapper_mixing is not None:
            if self.geometry is None:
                raise ValueError("A token-mixing mapper needs the tower's geometry.")
            self.probe = self.probe or GridProbe(self.geometry)
            self.probe.need_order |= config.mapper_mixing == "conv"
        self.set_adapter(adapter_name, inference_mode=config.inference_mode)

    def boost(self, features: torch.Tensor) -> torch.Tensor:
        layout = None
        for name in self._active(self.fs_booster_mapper):
            mapper = self.fs_booster_mapper[name]
            if mapper.mixing is not None and self.noise_level > 0 and layout is None:
                layout = self.probe.layout(features)
            features = mapper(features, self.noise_level, layout)
        return features

    def forward(self, x: torch.Tensor, *args, **kwargs):
        active = self._active(self.fs_booster_mapper)
        if not active:
            return self.base_layer(x, *args, **kwargs)
        if self.position[active[0]] == "before":
            return self.base_layer(self.boost(x), *args, **kwargs)
        out = self.base_layer(x, *args, **kwargs)
        if isinstance(out, tuple):  # layers that return (hidden_states, ...)
            return (self.boost(out[0]), *out[1:])
        return self.boost(out)


class GSBPurifierLayer(GSBLayer):
    """
    PEFT tuner layer around the module that first consumes the processed pixel values (a patch-embedding
    convolution, or Qwen-VL's `visual.patch_embed`): maps its input to the [0, 1] image with the smoothing's mean/std,
    adds the [`GSBPurifier`] residual there and maps back, so the tower sees the purified noisy image. Qwen-VL's
    patch-flattened rows are reassembled into frames with the grid read from a probe on `visual`.
    """

    adapter_layer_names = (f"{PARAMETER_PREFIX}purifier",)
    other_param_names = ()

    def update_layer(self, adapter_name: str, config: GSBConfig) -> None:
        if not hasattr(self, "fs_booster_purifier"):
            self.fs_booster_purifier = nn.ModuleDict()
        options = config.purifier
        channels = self.geometry.channels if self.geometry is not None else 3
        self.fs_booster_purifier[adapter_name] = self._place(GSBPurifier(channels, **options))
        self.trained_sigmas[adapter_name] = tuple(float(sigma) for sigma in config.sigmas)
        if self.geometry is not None and self.geometry.patch_flattened:
            self.probe = self.probe or GridProbe(self.geometry)
        self.set_adapter(adapter_name, inference_mode=config.inference_mode)

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pixel_stats is None:
            raise RuntimeError(
                "The pixel purifier needs the processor's image_mean / image_std to map pixels to [0, 1]; condition "
                "boosters with `booster_noise_level(model, sigma, image_mean=..., image_std=...)` (smoothing and "
                "GSBTrainer do this)."
            )
        mean, std = (torch.tensor(v, device=like.device, dtype=torch.float32).view(-1, 1, 1) for v in self.pixel_stats)
        return mean, std

    def purify(self, pixels: torch.Tensor, image_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        """Processed pixel values (the wrapped module's input) → purified pixel values, same layout and dtype.
        Qwen-VL rows take their grid from `image_grid_thw`, else from the running tower call."""
        names = self._active(self.fs_booster_purifier)
        if not names or self.noise_level <= 0:
            return pixels
        if self.probe is None:
            return self._purify_images(pixels, names)
        grid = image_grid_thw.long().cpu() if image_grid_thw is not None else self.probe.grid  # Qwen-VL patch rows
        if int(grid.prod(-1).sum()) != pixels.shape[0]:
            raise RuntimeError(f"The purifier got {pixels.shape[0]} pixel rows but the grid describes "
                               f"{int(grid.prod(-1).sum())} patches.")
        frames = patches_to_frames(pixels, grid, self.geometry)
        return frames_to_patches([self._purify_images(f, names) for f in frames], grid, self.geometry)

    def _purify_images(self, images: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        mean, std = self._stats(images)
        for name in names:
            purifier = self.fs_booster_purifier[name]
            weight = purifier.stem.weight
            unit = images.to(torch.float32) * std + mean
            residual = purifier(unit.to(weight.dtype), self.noise_level).to(torch.float32)
            images = images + (residual / std).to(images.dtype)  # exactly `images` while the residual is 0
        return images

    def to_unit(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixel values in this layer's input layout → [0, 1] intensities, same layout (float32)."""
        mean, std = self._stats(pixels)
        if self.probe is None:
            return pixels.float() * std + mean
        g = self.geometry
        rows = pixels.float().view(-1, g.channels, g.temporal_patch_size * g.patch_size * g.patch_size)
        return (rows * std.view(-1, 1) + mean.view(-1, 1)).view_as(pixels)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        return self.base_layer(self.purify(x), *args, **kwargs)


def booster_layers(model: nn.Module) -> list[GSBLayer]:
    """Every booster tuner layer (mapper and purifier) in `model`."""
    return [m for m in model.modules() if isinstance(m, GSBLayer)]


def unwrap_boosters(model: nn.Module, only: set[str] | None = None) -> nn.Module:
    """Put back the module each booster layer of `model` wraps (or only the layers named in `only`) and detach the
    layers' token-grid probes (their hooks sit on a tower module that stays): the one unwrap behind
    `remove_boosters`, `GSBModel.unload()` and a failed load's rollback."""
    for name, module in list(model.named_modules()):
        if isinstance(module, GSBLayer) and (only is None or name in only):
            if module.probe is not None:
                module.probe.detach()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.base_layer)
    return model


def booster_names(model: nn.Module) -> list[str]:
    """The names of the boosters held by `model`, read from every part of every booster layer (mapper and purifier:
    each layer's `adapter_layer_names`, PEFT's one list of a method's parts), sorted."""
    return sorted({name for layer in booster_layers(model) for part in layer.adapter_layer_names
                   for name in getattr(layer, part)})


# the booster is conditioned through the core protocol (`hf_feature_smoothing.smoothing.conditioning`); the booster-named
# entry points stay for code written against earlier versions
BoosterState = ConditionState
set_booster_condition = set_noise_condition
restore_booster_condition = restore_noise_condition


def booster_noise_level(model: nn.Module, sigma: float, image_mean: Sequence[float] | None = None,
                        image_std: Sequence[float] | None = None) -> contextlib.AbstractContextManager[None]:
    """Condition every booster in `model` on noise level `sigma` (pixel [0, 1] units) inside the block; a purifier
    also needs the processor's `image_mean` / `image_std` to map pixels to [0, 1]. The booster-named form of
    [`~hf_feature_smoothing.smoothing.conditioning.noise_condition`]."""
    return noise_condition(model, sigma, image_mean, image_std)

# names of 0.1.0 (the `FeatureBooster*` stem), kept as aliases that warn once
__getattr__ = deprecated_aliases(globals(), {"FeatureBoosterLayer": "GSBMapperLayer",
                                             "PixelPurifierLayer": "GSBPurifierLayer", "BoosterTunerLayer": "GSBLayer"})
