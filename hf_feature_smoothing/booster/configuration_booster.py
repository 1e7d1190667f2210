"""`GSBConfig`: the PEFT config of a Gaussian Smoothness Booster (GSB) adapter."""

import numbers
import os
from dataclasses import dataclass, field

from peft import PeftConfig
from peft.utils import PeftType

from ..models.registry import SMOOTHED_MODEL_CLASSES
from ..smoothing.configuration_feature_smoothing import FeatureSmoothingConfig
from ..utils.deprecation import deprecated_aliases
from ..utils.validation import check_sigma
from .registration import PEFT_TYPE_NAME, extend_peft_type


extend_peft_type(PEFT_TYPE_NAME)

POSITIONS = ("before", "after")
MIXINGS = ("attention", "conv")
PURIFIER_DEFAULTS = {"width": 32, "depth": 5, "scale": 2}


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"`{name}` must be an int ≥ {minimum}, got {value!r}.")
    return int(value)


@dataclass
class GSBConfig(PeftConfig):
    """
    Configuration of a Gaussian Smoothness Booster: an optional σ-conditioned pixel purifier inside the tower (it sees
    the noisy image, so it is part of the certified base function) and an optional noise-conditioned residual feature
    mapper z ↦ z + g(σ)·M(z, σ) on the feature site (see [`GSBMapper`], [`GSBPurifier`]). Every part is the
    identity at initialisation and at σ = 0. Saved as `adapter_config.json`.

    Args:
        target_modules (`list[str]` or `str`, *optional*):
            The modules the booster wraps. `None` picks the tower family's feature site for the mapper
            (LLaVA: `multi_modal_projector`; Qwen-VL: `visual.merger`; DINOv2 / ViT: `layernorm`; CLIP / SigLIP:
            `post_layernorm`, with `mapper_mixing` on CLIP the last encoder layer) plus, with a purifier,
            `purifier_module`.
        position (`str`, *optional*):
            `"before"` maps the site module's input, `"after"` its output; `None` takes the family's default.
        tower_family (`str`, *optional*):
            `model_type` of the tower the booster was built for (filled in when it is attached); loading it on another
            family fails.
        feature_dim (`int`, *optional*, defaults to 0):
            Width of the boosted features; 0 infers it from the model. A mismatch with the model fails.
        hidden_dim (`int`, *optional*, defaults to 256):
            Hidden width of the mapper's MLP.
        sigmas (`list[float]`, *optional*, defaults to `[0.25]`):
            Noise levels σ (pixel [0, 1] units) the booster is trained for; smoothing at another σ logs a warning.
        smoothing (`dict`, *optional*):
            The `FeatureSmoothingConfig` fields of the model the booster was attached to (recorded when it is attached
            to a smoothed model and when it is saved). Loading the booster into an *unsmoothed* MLLM
            (`PeftModel.from_pretrained`, `AutoPeftModel.from_pretrained`) restores this smoothing.
        mapper (`bool`, *optional*, defaults to `True`):
            Whether the booster has the feature-space mapper.
        mapper_mixing (`str`, *optional*):
            Token mixing in the mapper, before its token-wise MLP: `"attention"` (multi-head self-attention over each
            image's tokens, CLS included) or `"conv"` (a depth-wise convolution over each image's patch grid; prefix
            tokens such as CLS pass through it unchanged). `None`: token-wise only. Tokens of two images never mix.
        mixing_heads (`int`, *optional*, defaults to 4):
            Attention heads of `mapper_mixing="attention"` (must divide `feature_dim`).
        mixing_kernel_size (`int`, *optional*, defaults to 3):
            Odd kernel size of `mapper_mixing="conv"`.
        purifier (`bool` or `dict`, *optional*, defaults to `False`):
            A σ-conditioned pixel-space denoiser on the [0, 1] image, wrapped around the module that first consumes
            the pixel values. `True` uses `{"width": 32, "depth": 5, "scale": 2}`; a dict overrides any of them
            (`scale`: pixel-unshuffle factor, the conv net runs at 1/scale resolution with scale² × 3 channels).
        purifier_module (`str`, *optional*):
            The module the purifier wraps (filled in from the tower family: the patch-embedding convolution, or
            Qwen-VL's `visual.patch_embed`).
    """

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    position: str | None = None
    tower_family: str | None = None
    feature_dim: int = 0
    hidden_dim: int = 256
    sigmas: list[float] = field(default_factory=lambda: [0.25])
    modules_to_save: list[str] | None = None
    smoothing: dict | None = None
    mapper: bool = True
    mapper_mixing: str | None = None
    mixing_heads: int = 4
    mixing_kernel_size: int = 3
    purifier: bool | dict = False
    purifier_module: str | None = None

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType[PEFT_TYPE_NAME]
        if self.position not in (None, *POSITIONS):
            raise ValueError(f"`position` must be None or one of {POSITIONS}, got {self.position!r}.")
        self.feature_dim = _check_int("feature_dim", self.feature_dim, 0)
        self.hidden_dim = _check_int("hidden_dim", self.hidden_dim, 1)
        if not isinstance(self.sigmas, (list, tuple)) or not self.sigmas:
            raise ValueError(f"`sigmas` must be a non-empty list of noise levels, got {self.sigmas!r}.")
        self.sigmas = [check_sigma(s, "sigmas") for s in self.sigmas]
        if self.smoothing is not None:
            self.smoothing = FeatureSmoothingConfig.from_dict(self.smoothing).to_dict()  # validated
        if not isinstance(self.mapper, bool):
            raise ValueError(f"`mapper` must be True or False, got {self.mapper!r}.")
        if self.mapper_mixing not in (None, *MIXINGS):
            raise ValueError(f"`mapper_mixing` must be None or one of {MIXINGS}, got {self.mapper_mixing!r}.")
        if self.mapper_mixing is not None and not self.mapper:
            raise ValueError(f"`mapper_mixing={self.mapper_mixing!r}` needs the mapper; set `mapper=True`.")
        self.mixing_heads = _check_int("mixing_heads", self.mixing_heads, 1)
        self.mixing_kernel_size = _check_int("mixing_kernel_size", self.mixing_kernel_size, 1)
        if self.mixing_kernel_size % 2 == 0:
            raise ValueError(f"`mixing_kernel_size` must be odd (the grid keeps its size), got {self.mixing_kernel_size}.")
        self.purifier = self._purifier_options(self.purifier)
        if not self.mapper and not self.purifier:
            raise ValueError("The booster has neither a mapper nor a purifier: set `mapper=True` and/or `purifier=True`.")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None, **kwargs):
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        # named in loading errors (not a field: never saved)
        config._source = os.path.join(str(pretrained_model_name_or_path), subfolder or "", "adapter_model.safetensors")
        return config

    def save_pretrained(self, save_directory, **kwargs):
        """`adapter_config.json`, whose `auto_mapping` names a transformers Auto class: `AutoPeftModel` can then
        rebuild the base model without an `import_allowlist` (PEFT would otherwise record the smoothed model class
        from `hf_feature_smoothing`, outside its allowlist); the booster restores its smoothing on load."""
        if kwargs.get("auto_mapping_dict") is not None and self.tower_family is not None:
            auto = "AutoModelForImageTextToText" if self.tower_family in SMOOTHED_MODEL_CLASSES else "AutoModel"
            kwargs["auto_mapping_dict"] = {"base_model_class": auto, "parent_library": "transformers"}
        return super().save_pretrained(save_directory, **kwargs)

    @staticmethod
    def _purifier_options(purifier: object) -> dict | bool:
        """`False`, or the full option dict (so the saved config names the architecture it was trained with)."""
        if purifier is False or purifier is None:
            return False
        if purifier is True:
            return dict(PURIFIER_DEFAULTS)
        if not isinstance(purifier, dict):
            raise ValueError(f"`purifier` must be a bool or a dict of {sorted(PURIFIER_DEFAULTS)}, got {purifier!r}.")
        unknown = sorted(set(purifier) - set(PURIFIER_DEFAULTS))
        if unknown:
            raise ValueError(f"Unknown `purifier` options {unknown}; known: {sorted(PURIFIER_DEFAULTS)}.")
        options = {**PURIFIER_DEFAULTS, **purifier}
        minimum = {"width": 1, "depth": 2, "scale": 1}
        return {k: _check_int(f"purifier['{k}']", v, minimum[k]) for k, v in options.items()}

# names of 0.1.0 (the `FeatureBooster*` stem), kept as aliases that warn once
__getattr__ = deprecated_aliases(globals(), {"FeatureBoosterConfig": "GSBConfig"})
