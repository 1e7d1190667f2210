"""`FeatureSmoothingConfig`: what Feature-space Smoothing does to a vision tower, validated and JSON-serialisable.

One object is the single source of truth: a smoothed model's `config.feature_smoothing`, its `smoothing_config` and
its `smoothed_vision_tower.config` are the *same* `FeatureSmoothingConfig`, and every field is validated whenever it
is set, so an edit anywhere is an edit everywhere (and `save_pretrained` writes what the model runs)."""

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..utils.logging import get_logger
from ..utils.validation import check_positive_int, check_seed, check_sigma
from ..version import __version__


logger = get_logger(__name__)

SMOOTHED_FEATURES = ("vision", "projected")
AUTOCAST_DTYPES = ("bfloat16", "float16")
# the processor settings that fix the pixel grid the noise lives on (read from the checkpoint's processor config)
IMAGE_PROCESSOR_KEYS = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "min_pixels", "max_pixels",
                        "patch_size", "temporal_patch_size", "merge_size", "do_pad")


def _check_stats(name: str, value: Any) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise ValueError(f"`{name}` must be 3 finite per-channel values, got {value!r}.")
    values = [float(v) for v in value]
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"`{name}` must be 3 finite per-channel values, got {value!r}.")
    if name == "image_std" and min(values) <= 0:
        raise ValueError(f"`image_std` must be positive, got {values!r}.")
    if max(abs(v) for v in values) > 1:  # σ and certificates are in [0, 1] pixel units: 0–255 statistics rescale them
        raise ValueError(f"`{name}` must be on the [0, 1] pixel scale the noise lives in, got {values!r}; divide "
                         "0–255 statistics by 255 (e.g. 123.675 → 0.485).")
    return values


def _check_field(name: str, value: Any) -> Any:
    """Validate (and normalise) one field; errors name the field, the value and the fix."""
    if name == "sigma":
        return check_sigma(value)
    if name in ("num_samples", "chunk_size"):
        return check_positive_int(name, value)
    if name == "autocast_dtype" and value not in (None, *AUTOCAST_DTYPES):
        raise ValueError(f"`autocast_dtype` must be None or one of {AUTOCAST_DTYPES}, got {value!r}.")
    if name == "smoothed_features" and value not in SMOOTHED_FEATURES:
        raise ValueError(f"`smoothed_features` must be one of {SMOOTHED_FEATURES}, got {value!r}.")
    if name == "seed":
        return check_seed(value)
    if name in ("image_mean", "image_std"):
        return _check_stats(name, value)
    if name == "booster" and value is not None and not isinstance(value, str):
        value = str(value)  # a path
    if name == "image_processor" and value is not None:
        if not isinstance(value, dict) or set(value) - set(IMAGE_PROCESSOR_KEYS):
            raise ValueError(f"`image_processor` must be a dict with keys among {IMAGE_PROCESSOR_KEYS}, got {value!r}.")
        return dict(value)
    if name == "booster_config" and value is not None:
        if not isinstance(value, dict) or set(value) != {"adapter_name", "config"} or not isinstance(value["config"], dict):
            raise ValueError(f"`booster_config` must be {{'adapter_name': str, 'config': dict}}, got {value!r}.")
        return {"adapter_name": str(value["adapter_name"]), "config": dict(value["config"])}
    if name == "feature_center" and value is not None:
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
            raise ValueError(f"`feature_center` must be a list of finite means (per channel or per position), got {value!r}.")
        center = [float(v) for v in value]
        if not center or not all(math.isfinite(v) for v in center):
            raise ValueError(
                f"`feature_center` must be a non-empty list of finite means (per channel or per position), got "
                f"{len(center)} values "
                f"(non-finite: {sum(not math.isfinite(v) for v in center)}); re-estimate it with "
                "`estimate_feature_mean(model, images)`."
            )
        return center
    return value


@dataclass
class FeatureSmoothingConfig:
    """
    Configuration of Feature-space Smoothing (FS): the smoothed encoder f̂(x) = E[f(x + δ)], δ ~ N(0, σ²I), where f
    is the unit-normalised vision feature of one image and the noise is added in **pixel space** ([0, 1] intensities
    after resize/crop, before the processor's mean/std normalisation).

    Every field is validated when it is set, at construction and afterwards (`config.sigma = -1` raises).

    Args:
        sigma (`float`, *optional*, defaults to 0.25):
            Standard deviation σ of the Gaussian noise, in [0, 1] pixel units, in (0, 1000]. Certified radii scale
            linearly with σ. 0-d tensors and numpy scalars are accepted and stored as Python numbers (every field).
        num_samples (`int`, *optional*, defaults to 8):
            Number of noisy copies averaged in the forward pass (8 at inference in the paper). Not `n0`, which in
            this library always means the selection samples of `certify` (Cohen et al.).
        chunk_size (`int`, *optional*, defaults to 16):
            Most images (noisy copies × images in the batch) sent through the tower in one call; bounds memory.
        autocast_dtype (`str`, *optional*):
            `"bfloat16"` or `"float16"` to run the Monte Carlo tower passes under `torch.autocast`; `None` keeps the
            model's dtype. Features are always averaged in float32. In an MLLM's own forward, copy 1 of the n runs
            inside the model's tower call, in whatever dtype that call runs (certificates run every copy autocast).
        seed (`int`, *optional*):
            Seed of a dedicated `torch.Generator` for the noise. `None` (default) draws fresh noise from the global
            RNG; a fixed seed makes outputs reproducible but also predictable to an attacker.
        smoothed_features (`str`, *optional*, defaults to `"vision"`):
            Which features are smoothed: `"vision"` smooths the tower features the model feeds to its projector
            (LLaVA: `hidden_states[vision_feature_layer]`; Qwen: the merger input, plus Qwen3-VL deepstack inputs);
            `"projected"` smooths the projector/merger outputs the language model reads.
        image_mean (`list[float]`, *optional*):
            Per-channel mean of the processor's normalisation. `from_pretrained` reads it from the checkpoint's
            `processor_config.json` / `preprocessor_config.json`; `None` uses the tower family's default.
        image_std (`list[float]`, *optional*):
            Per-channel std of the processor's normalisation (same sources as `image_mean`).
        image_processor (`dict`, *optional*):
            The processor's resize / crop settings (`size`, `crop_size`, `do_center_crop`, `resample`, `do_pad`: a
            LLaVA processor's pad to a square in the mean colour first; Qwen-VL: `min_pixels`, `max_pixels`,
            `patch_size`, `merge_size`), read with the statistics: PIL images are
            certified on the pixel grid the model's own processor produces. `None` uses the model config's
            `image_size` (square resize and centre crop).
        booster (`str`, *optional*):
            Path or Hub repo id of the Gaussian Smoothness Booster the model holds: `from_pretrained(...,
            smoothing={"booster": ...})` loads it and `load_booster` sets it; `remove_boosters` clears it. A config
            never names a booster the model does not hold (`SmoothedVisionTower(model, config)` and `save_pretrained`
            refuse one).
        booster_config (`dict`, *optional*):
            Set by `save_pretrained` when the saved weights contain a booster: `{"adapter_name", "config"}` with the
            adapter's `adapter_config.json` content, so the model reloads with the booster and without the network.
        feature_center (`list[float]`, *optional*):
            Mean feature μ of the primary feature site, one value per feature channel (subtracted from every token)
            or, for fixed-resolution towers, one value per entry of an image's whole feature (tokens × channels,
            subtracted position by position), estimated on reference images with
            `hf_feature_smoothing.certification.estimate_feature_mean` (`per_position=True` for the latter). The
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
    image_processor: dict | None = None
    booster: str | None = None
    booster_config: dict | None = None
    feature_center: list[float] | None = None
    library_version: str = field(default=__version__, repr=False)

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, _check_field(name, value))

    def to_dict(self) -> dict[str, Any]:
        """Serialise to a JSON-compatible dict (stored under `feature_smoothing` in the model's `config.json`)."""
        return dataclasses.asdict(self)

    def update(self, values: "dict[str, Any] | FeatureSmoothingConfig") -> "FeatureSmoothingConfig":
        """Set the fields named in `values` (a dict, or every field of another config) in place, all or none."""
        data = values.to_dict() if isinstance(values, FeatureSmoothingConfig) else dict(values)
        data.pop("library_version", None)
        merged = FeatureSmoothingConfig.from_dict({**self.to_dict(), **data})  # validates everything first
        for f in dataclasses.fields(self):
            if f.name != "library_version":
                object.__setattr__(self, f.name, getattr(merged, f.name))
        return self

    @classmethod
    def overrides(cls, smoothing: "dict[str, Any] | FeatureSmoothingConfig | None") -> dict[str, Any]:
        """The fields a user override sets: every key of a dict (`{"seed": None}` resets the seed), or the fields of
        a `FeatureSmoothingConfig` that differ from the defaults. Overriding one field keeps all the others."""
        if smoothing is None:
            return {}
        if isinstance(smoothing, FeatureSmoothingConfig):
            default = cls().to_dict()
            return {k: v for k, v in smoothing.to_dict().items() if k != "library_version" and v != default[k]}
        if not isinstance(smoothing, dict):
            raise TypeError(f"`smoothing` must be a dict or FeatureSmoothingConfig, got {type(smoothing).__name__}.")
        unknown = sorted(set(smoothing) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"Unknown smoothing field(s) {unknown} in `smoothing`; the fields are "
                             f"{[f.name for f in dataclasses.fields(cls)]}.")
        cls.from_dict(smoothing)  # validate the values now
        return {k: v for k, v in smoothing.items() if k != "library_version"}

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
