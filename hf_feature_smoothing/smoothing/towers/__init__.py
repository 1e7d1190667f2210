"""Registry of vision-tower families, keyed by `config.model_type`."""

from torch import nn

from ..configuration_feature_smoothing import FeatureSmoothingConfig
from .base import BoosterGeometry, ImageInputs, TowerAdapter


TOWER_ADAPTERS: dict[str, type[TowerAdapter]] = {}
SMOOTHED_PREFIX = "smoothed_"


def register_tower_adapter(cls: type[TowerAdapter]) -> type[TowerAdapter]:
    """Class decorator: make `cls` the adapter of every model type in `cls.model_types`."""
    for model_type in cls.model_types:
        if model_type in TOWER_ADAPTERS and TOWER_ADAPTERS[model_type] is not cls:
            raise KeyError(f"Model type {model_type!r} already has adapter {TOWER_ADAPTERS[model_type].__name__}.")
        TOWER_ADAPTERS[model_type] = cls
    return cls


def base_model_type(model: nn.Module) -> str:
    """`config.model_type` of `model`, with the `smoothed_` prefix of our own model types removed."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise ValueError(
            f"`model` ({type(model).__name__}) has no `config.model_type`; pass a transformers model. Supported "
            f"model types: {sorted(TOWER_ADAPTERS)}."
        )
    return model_type.removeprefix(SMOOTHED_PREFIX)


def get_tower_adapter(model: nn.Module, config: FeatureSmoothingConfig) -> TowerAdapter:
    """Build the adapter for `model` (a `PeftModel` is unwrapped: boosters live inside the base model); an
    unsupported model gets an error listing the supported model types."""
    if callable(getattr(model, "get_base_model", None)):
        model = model.get_base_model()
    model_type = base_model_type(model)
    if model_type not in TOWER_ADAPTERS:
        raise ValueError(
            f"Unsupported vision tower: model type {model_type!r} ({type(model).__name__}). Supported model types: "
            f"{sorted(TOWER_ADAPTERS)}. Register a `TowerAdapter` subclass with `register_tower_adapter` to add one."
        )
    return TOWER_ADAPTERS[model_type](model, config)


# Families register themselves on import.
from . import llava, qwen_vl, vision  # noqa: E402, F401


__all__ = ["TOWER_ADAPTERS", "BoosterGeometry", "ImageInputs", "TowerAdapter", "base_model_type", "get_tower_adapter", "register_tower_adapter"]
