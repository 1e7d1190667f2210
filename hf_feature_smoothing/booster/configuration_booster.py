"""`FeatureBoosterConfig`: the PEFT config of a Gaussian Smoothness Booster (GSB) adapter."""

import os
from dataclasses import dataclass, field

from peft import PeftConfig
from peft.utils import PeftType

from ..configuration_feature_smoothing import FeatureSmoothingConfig
from ..errors import check_finite_positive
from .registration import PEFT_TYPE_NAME, extend_peft_type


extend_peft_type(PEFT_TYPE_NAME)

POSITIONS = ("before", "after")


@dataclass
class FeatureBoosterConfig(PeftConfig):
    """
    Configuration of a Gaussian Smoothness Booster: a noise-conditioned residual feature mapper z ↦ z + g(σ)·M(z, σ)
    plugged around one module of a frozen vision tower (see [`GSBMapper`]). Saved as `adapter_config.json`.

    Args:
        target_modules (`list[str]` or `str`, *optional*):
            The module the booster wraps. `None` picks the tower family's feature site (LLaVA: `multi_modal_projector`;
            Qwen-VL: `visual.merger`; DINOv2 / ViT: `layernorm`; CLIP / SigLIP: `vision_model.post_layernorm`).
        position (`str`, *optional*):
            `"before"` maps the module's input, `"after"` its output; `None` takes the family's default.
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

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType[PEFT_TYPE_NAME]
        if self.position not in (None, *POSITIONS):
            raise ValueError(f"`position` must be None or one of {POSITIONS}, got {self.position!r}.")
        for name in ("feature_dim", "hidden_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "feature_dim" else 1):
                raise ValueError(f"`{name}` must be a {'non-negative' if name == 'feature_dim' else 'positive'} int, "
                                 f"got {value!r}.")
        if not isinstance(self.sigmas, (list, tuple)) or not self.sigmas:
            raise ValueError(f"`sigmas` must be a non-empty list of noise levels, got {self.sigmas!r}.")
        self.sigmas = [check_finite_positive("sigmas", s, "σ is in [0, 1] pixel units, e.g. `sigmas=[0.25]`.")
                       for s in self.sigmas]
        if self.smoothing is not None:
            self.smoothing = FeatureSmoothingConfig.from_dict(self.smoothing).to_dict()  # validated

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
        from ..models import SMOOTHED_MODEL_CLASSES

        if kwargs.get("auto_mapping_dict") is not None and self.tower_family is not None:
            auto = "AutoModelForImageTextToText" if self.tower_family in SMOOTHED_MODEL_CLASSES else "AutoModel"
            kwargs["auto_mapping_dict"] = {"base_model_class": auto, "parent_library": "transformers"}
        return super().save_pretrained(save_directory, **kwargs)
