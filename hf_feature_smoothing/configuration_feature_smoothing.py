"""`FeatureSmoothingConfig`: what Feature-space Smoothing does to a vision tower, validated and JSON-serialisable."""

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import check_finite_positive, check_positive_int
from .logging_utils import get_logger
from .version import __version__


logger = get_logger(__name__)

SMOOTHED_FEATURES = ("vision", "projected")
AUTOCAST_DTYPES = ("bfloat16", "float16")


@dataclass
class FeatureSmoothingConfig:
    """
    Configuration of Feature-space Smoothing (FS): the smoothed encoder f̂(x) = E[f(x + δ)], δ ~ N(0, σ²I), where f
    is the unit-normalised vision feature of one image and the noise is added in **pixel space** ([0, 1] intensities
    after resize/crop, before the processor's mean/std normalisation).

    Args:
        sigma (`float`, *optional*, defaults to 0.25):
            Standard deviation σ of the Gaussian noise, in [0, 1] pixel units. Certified radii scale linearly with σ.
        num_samples (`int`, *optional*, defaults to 8):
            Number of noisy copies n averaged in the forward pass (the paper's n0 = 8 at inference).
        chunk_size (`int`, *optional*, defaults to 16):
            Most images (noisy copies × images in the batch) sent through the tower in one call; bounds memory.
        autocast_dtype (`str`, *optional*):
            `"bfloat16"` or `"float16"` to run the Monte Carlo tower passes under `torch.autocast`; `None` keeps the
            model's dtype. Features are always averaged in float32.
        seed (`int`, *optional*):
            Seed of a dedicated `torch.Generator` for the noise. `None` (default) draws fresh noise from the global
            RNG; a fixed seed makes outputs reproducible but also predictable to an attacker.
        smoothed_features (`str`, *optional*, defaults to `"vision"`):
            Which features are smoothed: `"vision"` smooths the tower features the model feeds to its projector
            (LLaVA: `hidden_states[vision_feature_layer]`; Qwen: the merger input, plus Qwen3-VL deepstack inputs);
            `"projected"` smooths the projector/merger outputs the language model reads.
        image_mean (`list[float]`, *optional*):
            Per-channel mean of the processor's normalisation. `None` uses the tower family's default.
        image_std (`list[float]`, *optional*):
            Per-channel std of the processor's normalisation. `None` uses the tower family's default.
        booster (`str`, *optional*):
            Path or Hub repo id of a Gaussian Smoothness Booster adapter to load with the model.
        feature_center (`list[float]`, *optional*):
            Mean feature μ of the primary feature site, one value per feature channel (subtracted from every token),
            estimated on reference images with `hf_feature_smoothing.certification.estimate_feature_mean`. The
            certified base feature becomes normalise(f − μ), so a certified cosine is no longer inflated by the
            direction every image shares; the language model still receives features in the raw space
            (μ + the smoothed centred direction × the mean centred norm). `None` (default): no centring.
    """

    sigma: float = 0.25
    num_samples: int = 8
    chunk_size: int = 16
    autocast_dtype: str | None = None
    seed: int | None = None
    smoothed_features: str = "vision"
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    booster: str | None = None
    feature_center: list[float] | None = None
    library_version: str = field(default=__version__, repr=False)

    def __post_init__(self):
        check_finite_positive("sigma", self.sigma, "σ is the noise std in [0, 1] pixel units, e.g. `sigma=0.25`.")
        check_positive_int("num_samples", self.num_samples)
        check_positive_int("chunk_size", self.chunk_size)
        if self.autocast_dtype not in (None, *AUTOCAST_DTYPES):
            raise ValueError(f"`autocast_dtype` must be None or one of {AUTOCAST_DTYPES}, got {self.autocast_dtype!r}.")
        if self.smoothed_features not in SMOOTHED_FEATURES:
            raise ValueError(
                f"`smoothed_features` must be one of {SMOOTHED_FEATURES}, got {self.smoothed_features!r}."
            )
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise TypeError(f"`seed` must be an int or None, got {self.seed!r}.")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if value is None:
                continue
            value = [float(v) for v in value]
            if len(value) != 3 or not all(math.isfinite(v) for v in value):
                raise ValueError(f"`{name}` must be 3 finite per-channel values, got {value!r}.")
            setattr(self, name, value)
        if self.image_std is not None and min(self.image_std) <= 0:
            raise ValueError(f"`image_std` must be positive, got {self.image_std!r}.")
        if self.feature_center is not None:
            center = [float(v) for v in self.feature_center]
            if not center or not all(math.isfinite(v) for v in center):
                raise ValueError(
                    f"`feature_center` must be a non-empty list of finite per-channel means, got {len(center)} values "
                    f"(non-finite: {sum(not math.isfinite(v) for v in center)}); re-estimate it with "
                    "`estimate_feature_mean(model, images)`."
                )
            self.feature_center = center

    def to_dict(self) -> dict[str, Any]:
        """Serialise to a JSON-compatible dict (stored under `feature_smoothing` in the model's `config.json`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: "dict[str, Any] | FeatureSmoothingConfig") -> "FeatureSmoothingConfig":
        """Build from a dict; keys written by a newer version are dropped with a warning instead of failing."""
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            raise TypeError(f"`feature_smoothing` must be a dict or FeatureSmoothingConfig, got {type(data).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning(
                f"Ignoring unknown feature-smoothing keys {unknown} (saved by hf_feature_smoothing "
                f"{data.get('library_version', '?')}?). Upgrade with `pip install -U hf_feature_smoothing`."
            )
        kwargs = {k: v for k, v in data.items() if k in known and k != "library_version"}
        return cls(**kwargs)
