"""Registry of vision-tower families, keyed by `config.model_type`."""

from torch import nn

from ...utils.deprecation import deprecated_aliases
from ..configuration_feature_smoothing import FeatureSmoothingConfig
from .base import BoosterGeometry, ImageInputs, TowerFamily


TOWER_FAMILIES: dict[str, type[TowerFamily]] = {}
SMOOTHED_PREFIX = "smoothed_"


def register_tower_family(cls: type[TowerFamily]) -> type[TowerFamily]:
    """Class decorator: make `cls` the tower family of every model type in `cls.model_types`."""
    for model_type in cls.model_types:
        if model_type in TOWER_FAMILIES and TOWER_FAMILIES[model_type] is not cls:
            raise KeyError(f"Model type {model_type!r} already has the tower family {TOWER_FAMILIES[model_type].__name__}.")
        TOWER_FAMILIES[model_type] = cls
    return cls


def base_model_type(model: nn.Module) -> str:
    """`config.model_type` of `model`, with the `smoothed_` prefix of our own model types removed."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise ValueError(
            f"`model` ({type(model).__name__}) has no `config.model_type`; pass a transformers model. Supported "
            f"model types: {sorted(TOWER_FAMILIES)}."
        )
    return model_type.removeprefix(SMOOTHED_PREFIX)


def get_tower_family(model: nn.Module, config: FeatureSmoothingConfig) -> TowerFamily:
    """Build the tower family for `model` (a `PeftModel` is unwrapped: boosters live inside the base model); an
    unsupported model gets an error listing the supported model types."""
    if callable(getattr(model, "get_base_model", None)):
        model = model.get_base_model()
    model_type = base_model_type(model)
    if model_type not in TOWER_FAMILIES:
        raise ValueError(
            f"Unsupported vision tower: model type {model_type!r} ({type(model).__name__}). Supported model types: "
            f"{sorted(TOWER_FAMILIES)}. Register a `TowerFamily` subclass with `register_tower_family` to add one."
        )
    return TOWER_FAMILIES[model_type](model, config)


# Families register themselves on import.
from . import llava, qwen_vl, vision  # noqa: E402, F401


__all__ = ["TOWER_FAMILIES", "BoosterGeometry", "ImageInputs", "TowerFamily", "base_model_type", "get_tower_family", "register_tower_family"]

# names of 0.1.0 (the tower integration was called an adapter), kept as aliases that warn once
__getattr__ = deprecated_aliases(globals(), {"TowerAdapter": "TowerFamily", "TOWER_ADAPTERS": "TOWER_FAMILIES",
                                             "get_tower_adapter": "get_tower_family",
                                             "register_tower_adapter": "register_tower_family"})
