"""The contract a vision-tower family fulfils so that smoothing, certification and attacks can drive it."""

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ...utils.deprecation import deprecated_aliases, warn_renamed
from ...utils.logging import get_logger
from ...utils.validation import check_channels
from ..configuration_feature_smoothing import FeatureSmoothingConfig
from .inputs import (  # noqa: F401  (re-exported: their home before 0.2.0)
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageInputs,
    center_crop,
    pil_to_tensor,
)
from .processor import PixelStats, processor_pixels, resolve_pixel_stats


logger = get_logger(__name__)


@dataclass(frozen=True)
class BoosterGeometry:
    """
    Where a tower family's pixels enter the tower and how its feature site lays out an image's tokens: what a pixel
    purifier wraps and how a token-mixing mapper finds each image's patch grid.

    Args:
        pixel_entry (`str`): dotted path (a suffix of the model's module names) of the module that first consumes the
            processed pixel values; a purifier wraps it, so it runs inside the tower call, on the noisy image.
        grid_source (`str`): dotted path of the module whose call carries the images' patch grid: `pixel_entry` for
            `(B, C, H, W)` pixels, Qwen-VL's `visual` (its `grid_thw` argument).
        patch_size (`int`): pixels per patch side.
        patch_flattened (`bool`): Qwen-VL pixel rows `(Σ t·h·w, C·T·p·p)` in m×m merge-window order.
        merge_size (`int`), temporal_patch_size (`int`), channels (`int`): Qwen-VL patch layout.
        token_target (`str`, *optional*): feature site of a token-mixing mapper when the default site holds one pooled
            vector per image (CLIP vision model: the last encoder layer's output).
        site_order (`Callable`, *optional*): `(grid_source module, grid_thw) → merge-unit permutation` of the rows at
            the feature site, when the tower reorders them (Qwen2.5-VL runs its blocks in window order).
    """

    pixel_entry: str
    grid_source: str
    patch_size: int
    patch_flattened: bool = False
    merge_size: int = 1
    temporal_patch_size: int = 1
    channels: int = 3
    token_target: str | None = None
    site_order: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None


def pixel_conv(tower: nn.Module) -> tuple[str, nn.Conv2d]:
    """Name (relative to `tower`) and module of an image tower's patch-embedding convolution: its first `nn.Conv2d`,
    the module that first consumes the pixel values (a tuner layer wrapping it counts as it)."""
    for name, module in tower.named_modules():
        base = unwrap_tuner_layer(module)
        if isinstance(base, nn.Conv2d):
            return name, base
    raise ValueError(f"{type(tower).__name__} has no patch-embedding `nn.Conv2d`; a pixel purifier cannot find where "
                     "its pixels enter.")


def unwrap_tuner_layer(module: nn.Module) -> nn.Module:
    """The module a PEFT tuner layer (e.g. a booster placed *before* a feature site) wraps, else `module`: feature
    sites are hooked on the wrapped module, so they see the boosted features."""
    while isinstance(getattr(module, "base_layer", None), nn.Module):
        module = module.base_layer
    return module


# ids of tower modules inside an `encode` pass: smoothing hooks of *any* SmoothedVisionTower on them stand aside
_CAPTURING: set[int] = set()


class _StopCapture(Exception):
    """Raised by the last capture hook: everything after the smoothed features is not needed."""


class _SiteHook:
    """Forward (pre-)hook calling `fn(features)` on a site's input (`"vision"`) or output (`"projected"`), whichever
    `config.smoothed_features` says *now*. An object, not a closure: `copy.deepcopy(model)` gives the copy hooks
    bound to its own smoothing (a closure would keep calling the original's)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor | None], config: FeatureSmoothingConfig, where: str):
        self.fn, self.config, self.where = fn, config, where

    def __call__(self, module: nn.Module, args: tuple, output=None):
        if self.config.smoothed_features != self.where:
            return None
        if self.where == "projected":
            return self.fn(output)
        new = self.fn(args[0])
        return None if new is None else (new, *args[1:])


class _Handles:
    """Removes several hook handles at once."""

    def __init__(self, *handles: torch.utils.hooks.RemovableHandle):
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class TowerFamily(ABC):
    """
    Everything that differs between vision-tower families, behind one interface.

    Subclasses say where the tower and the *feature sites* (the modules whose input, or output, carries the features
    that get smoothed) are, and how processed `pixel_values` map to an **image tensor** in [0, 1] pixel space where
    every pixel appears exactly once: the space in which noise and perturbations live and ℓ2 norms are taken.
    """

    model_types: tuple[str, ...] = ()
    #: (mean, std) of the family's transformers image processor, assumed when neither the smoothing config nor the
    #: checkpoint gives statistics; a dict `{model_type: (mean, std)}` where they differ within the family
    default_stats: tuple | dict = (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    def __init__(self, model: nn.Module, config: FeatureSmoothingConfig):
        self.model = model
        self.config = config
        self._captured: list[torch.Tensor] = []
        self.primary_channels: int | None = None  # channels per token of the primary site, set by `encode`
        self._fallback: PixelStats | None = None
        if config.image_mean is None or config.image_std is None:  # the family default, with a warning
            self._fallback = resolve_pixel_stats(self.model_type, config.image_mean, config.image_std, once=True,
                                                 default=self.family_default_stats(self.model_type))

    @classmethod
    def family_default_stats(cls, model_type: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The normalisation statistics assumed for `model_type` when the checkpoint's processor gives none: the
        nearest `default_stats` in the class hierarchy (or the older spelling, `default_image_mean` /
        `default_image_std` class attributes, still honoured)."""
        for klass in cls.__mro__:
            if "default_stats" in vars(klass):
                stats = klass.default_stats
                return stats[model_type] if isinstance(stats, dict) else stats
            if not isinstance(vars(klass).get("default_image_mean", property()), property):
                return klass.default_image_mean, klass.default_image_std
        raise TypeError(f"{cls.__name__} has no `default_stats`.")

    @property
    def model_type(self) -> str:
        """The stock `model_type` of the model this family handles (e.g. `"llava"`)."""
        return getattr(self.model.config, "model_type", "?").removeprefix("smoothed_")

    @property
    def family(self) -> str:
        warn_renamed("TowerFamily", "family", "model_type")
        return self.model_type

    @property
    def default_image_mean(self) -> tuple[float, ...]:
        return self.family_default_stats(self.model_type)[0]

    @property
    def default_image_std(self) -> tuple[float, ...]:
        return self.family_default_stats(self.model_type)[1]

    # read from the (live) config on every use: editing `config.image_mean` takes effect at once
    @property
    def image_mean(self) -> tuple[float, ...]:
        return tuple(self.config.image_mean or (self._fallback.mean if self._fallback else self.default_image_mean))

    @property
    def image_std(self) -> tuple[float, ...]:
        return tuple(self.config.image_std or (self._fallback.std if self._fallback else self.default_image_std))

    @property
    def pixel_stats(self) -> PixelStats:
        """`(image_mean, image_std)` as used now: a booster's pixel purifier maps pixels to [0, 1] with them."""
        return PixelStats(self.image_mean, self.image_std)

    @property
    def capturing(self) -> bool:
        """True while the tower runs inside `encode`: smoothing hooks must pass features through unchanged."""
        return id(self.tower()) in _CAPTURING

    # ----- where things are -------------------------------------------------------------------------------------
    @abstractmethod
    def tower(self) -> nn.Module:
        """The vision tower module whose call receives the (clean) pixel values."""

    def site_modules(self) -> list[nn.Module]:
        """Feature sites in the order they run; the **last** one is the primary site (the certified feature)."""
        return []

    # ----- Gaussian Smoothness Booster ----------------------------------------------------------------------------
    booster_position: str = "before"
    """Whether the booster maps the input (`"before"`) or the output (`"after"`) of `booster_target()`."""

    def booster_target(self) -> str:
        """Dotted path (relative to the model) of the module a Gaussian Smoothness Booster wraps."""
        raise NotImplementedError(f"{type(self).__name__} does not say where a booster goes (`booster_target`).")

    def booster_feature_dim(self) -> int:
        """Width of the features the booster maps (last dimension at the booster position)."""
        raise NotImplementedError(f"{type(self).__name__} does not give the booster width (`booster_feature_dim`).")

    def booster_geometry(self) -> BoosterGeometry:
        """Pixel entry and token layout for a pixel purifier or a token-mixing mapper (see [`BoosterGeometry`])."""
        raise NotImplementedError(f"{type(self).__name__} has no pixel purifier / token mixing (`booster_geometry`).")

    # ----- inputs -----------------------------------------------------------------------------------------------
    @abstractmethod
    def inputs_from_call(self, args: tuple, kwargs: dict) -> ImageInputs:
        """Read the image inputs from the arguments of a tower call."""

    @abstractmethod
    def replace_call_pixels(self, args: tuple, kwargs: dict, pixel_values: torch.Tensor) -> tuple[tuple, dict]:
        """Return the tower-call arguments with `pixel_values` swapped in."""

    @abstractmethod
    def to_image(self, inputs: ImageInputs) -> torch.Tensor:
        """Processed pixel values → image tensor in [0, 1] pixel space (each pixel once)."""

    @abstractmethod
    def from_image(self, image: torch.Tensor, inputs: ImageInputs) -> torch.Tensor:
        """Image tensor (possibly `k` copies stacked along dim 0) → processed pixel values in the model's dtype."""

    @abstractmethod
    def repeat(self, inputs: ImageInputs, copies: int) -> ImageInputs:
        """Inputs describing `copies` copies of every image, copies-major (pixel values filled in by the caller)."""

    @abstractmethod
    def split(self, inputs: ImageInputs) -> list[ImageInputs]:
        """One `ImageInputs` per image."""

    @abstractmethod
    def rows_per_image(self, inputs: ImageInputs, num_rows: int) -> list[int]:
        """How the `num_rows` rows of one site's features (one copy) divide among the images."""

    def noisy_copies(self, inputs: ImageInputs, copies: int, sigma: float,
                     noise: Callable[[torch.Tensor], torch.Tensor] | None) -> ImageInputs:
        """
        `copies` copies of every image of `inputs` (copies-major) with σ·noise added in [0, 1] pixel space: the one
        path from processed pixels to noisy processed pixels (`to_image`, add, `from_image`).

        Args:
            inputs (`ImageInputs`): the clean images.
            copies (`int`): copies per image.
            sigma (`float`): the noise level σ.
            noise (`Callable`, *optional*): `noise(image)` gives standard normal noise `(copies, *image.shape)` for
                the [0, 1] image tensor of `inputs`; `None` gives clean copies.
        """
        image = self.to_image(inputs)
        if noise is None:
            pixels = image.unsqueeze(0).expand(copies, *image.shape)
        else:
            pixels = image.unsqueeze(0) + sigma * noise(image).to(image.dtype)
        repeated = self.repeat(inputs, copies)
        return repeated.with_pixels(self.from_image(pixels.flatten(0, 1), repeated))

    def as_rows(self, features: torch.Tensor) -> torch.Tensor:
        """Site features → `(rows, feature_dim)`; the rows of an image together form its feature vector."""
        return features.flatten(1) if features.ndim > 2 else features

    def default_image_size(self) -> int:
        config = getattr(self.model.config, "vision_config", self.model.config)
        return int(getattr(config, "image_size", 224))

    @property
    def num_channels(self) -> int:
        """Colour channels the tower's images have (its vision config's `num_channels` / `in_channels`; else 3)."""
        config = getattr(self.model.config, "vision_config", self.model.config)
        for key in ("num_channels", "in_channels", "in_chans"):
            if isinstance(getattr(config, key, None), int):
                return getattr(config, key)
        return 3

    def check_channels(self, name: str, pixel_values: torch.Tensor) -> None:
        """Raise unless `(B, C, H, W)` `pixel_values` have the tower's channels (see [`check_channels`])."""
        check_channels(name, pixel_values.shape[1], self.num_channels, tuple(pixel_values.shape))

    def preprocess(self, images: list, image_size: int | None = None) -> ImageInputs:
        """PIL images → processed inputs at the model's own processor resolution and crop (`config.image_processor`,
        read from the checkpoint), or, with `image_size` (or without processor settings), resized so the short side
        is `image_size` (default: the model config's) and centre-cropped to a square; then normalised."""
        geometry = self.config.image_processor
        if image_size is None and geometry:
            pixels = [processor_pixels(img, geometry, self.image_mean) for img in images]
            if len({p.shape for p in pixels}) > 1:
                raise ValueError(f"The processor settings {geometry} give images of different sizes "
                                 f"{sorted({tuple(p.shape) for p in pixels})}; pass `image_size=` to crop them alike.")
            image = torch.stack(pixels)
        else:
            size = image_size or self.default_image_size()
            image = torch.stack([pil_to_tensor(center_crop(img, size, size)) for img in images])
        like = ImageInputs(image)
        return like.with_pixels(self.from_image(image, like))

    # ----- running the tower ------------------------------------------------------------------------------------
    @abstractmethod
    def run(self, inputs: ImageInputs) -> None:
        """Run the model far enough that every feature site sees `inputs`."""

    def encode(self, inputs: ImageInputs) -> list[torch.Tensor]:
        """Site features of `inputs` as `(rows, feature_dim)` tensors, one per site (primary last), un-normalised.

        Feature-site hooks installed by smoothing are bypassed, so this is the *base* encoder f (before
        normalisation), computed without touching anything downstream of the last site.
        """
        sites = self.site_modules()
        handles = [self._capture_hook(m, last=i == len(sites) - 1) for i, m in enumerate(sites)]
        key, self._captured = id(self.tower()), []
        _CAPTURING.add(key)
        try:
            self.run(inputs)
        except _StopCapture:
            pass
        finally:
            _CAPTURING.discard(key)
            for h in handles:
                h.remove()
        captured, self._captured = self._captured, []
        if len(captured) != len(sites):
            raise RuntimeError(f"Expected features from {len(sites)} site(s), captured {len(captured)}.")
        self.primary_channels = captured[-1].shape[-1]  # per token, before `as_rows` may flatten an image's tokens
        return [self.as_rows(c) for c in captured]

    def _capture_hook(self, module: nn.Module, last: bool) -> torch.utils.hooks.RemovableHandle:
        def capture(features: torch.Tensor):
            self._captured.append(features)
            if last:
                raise _StopCapture

        if self.config.smoothed_features == "projected":
            return module.register_forward_hook(lambda m, a, out: capture(out), prepend=True)
        return module.register_forward_pre_hook(lambda m, args: capture(args[0]), prepend=True)

    def register_site_hook(
        self, module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor | None]
    ) -> _Handles:
        """Hook `fn(features) -> replacement | None` on the site's input (`"vision"`) or output (`"projected"`),
        following `config.smoothed_features` at call time (so editing it takes effect without re-installing)."""
        return _Handles(module.register_forward_pre_hook(_SiteHook(fn, self.config, "vision")),
                        module.register_forward_hook(_SiteHook(fn, self.config, "projected")))

    # ----- pixel-space helpers shared by the families -----------------------------------------------------------
    def _stats(self, like: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.image_mean, device=like.device, dtype=torch.float32).view(shape)
        std = torch.tensor(self.image_std, device=like.device, dtype=torch.float32).view(shape)
        return mean, std

# names of 0.1.0 (the tower integration was called an adapter), kept as aliases that warn once
__getattr__ = deprecated_aliases(globals(), {"TowerAdapter": "TowerFamily"})
