"""`FeatureBoosterConfig`: the PEFT config of a Gaussian Smoothness Booster (GSB) adapter."""

from dataclasses import dataclass, field

from peft import PeftConfig
from peft.utils import PeftType

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
    """

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    position: str | None = None
    tower_family: str | None = None
    feature_dim: int = 0
    hidden_dim: int = 256
    sigmas: list[float] = field(default_factory=lambda: [0.25])
    modules_to_save: list[str] | None = None

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
