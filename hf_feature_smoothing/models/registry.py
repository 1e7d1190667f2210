"""The registry of smoothed model types: `register_smoothed_model` (called by each model module) registers a type with
transformers' Auto classes and fills [`SMOOTHED_MODEL_CLASSES`], the one list of supported MLLM families that every
other part reads (the Auto `smoothing=` path, the CLI, towers loaded from a stock MLLM)."""

from transformers import AutoConfig, AutoModelForImageTextToText, PreTrainedConfig, PreTrainedModel
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

from ..smoothing.towers import SMOOTHED_PREFIX, TOWER_FAMILIES


# stock `model_type` (the tower family, e.g. "llava") -> its smoothed model class; filled by `register_smoothed_model`
SMOOTHED_MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {}


def register_smoothed_model(config_cls: type[PreTrainedConfig], model_cls: type[PreTrainedModel]) -> None:
    """Register a smoothed model type (`model_type` = "smoothed_" + the stock type) with the Auto classes and in
    [`SMOOTHED_MODEL_CLASSES`], and reuse the stock checkpoint key mapping (without it, `lm_head` would be silently
    re-initialised when loading a stock checkpoint)."""
    if not config_cls.model_type.startswith(SMOOTHED_PREFIX):
        raise ValueError(f"A smoothed model type must start with {SMOOTHED_PREFIX!r}, got {config_cls.model_type!r}.")
    AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
    AutoModelForImageTextToText.register(config_cls, model_cls, exist_ok=True)
    SMOOTHED_MODEL_CLASSES[config_cls.model_type.removeprefix(SMOOTHED_PREFIX)] = model_cls
    stock_cls = next(c for c in model_cls.__mro__[1:] if c.__module__.startswith("transformers."))
    mapping = get_checkpoint_conversion_mapping(stock_cls.__name__) or get_checkpoint_conversion_mapping(
        config_cls.model_type.removeprefix(SMOOTHED_PREFIX)
    )
    if mapping is not None:
        try:
            register_checkpoint_conversion_mapping(model_cls.__name__, mapping)
        except ValueError:  # already registered (module re-imported)
            pass


def smoothed_family(config: PreTrainedConfig) -> str:
    """The stock model type (tower family) of `config`: its `model_type` without the `smoothed_` prefix."""
    return config.model_type.removeprefix(SMOOTHED_PREFIX)


def smoothed_class_for(config: PreTrainedConfig, name=None) -> type[PreTrainedModel] | None:
    """The one class decision for a checkpoint of `config` (stock or smoothed): its `Smoothed*` MLLM class from
    [`SMOOTHED_MODEL_CLASSES`], or `None` for a stand-alone vision encoder of a supported tower family (it loads as a
    `SmoothedVisionTower`); a `ValueError` naming the model type and the supported ones otherwise."""
    family = smoothed_family(config)
    if family in SMOOTHED_MODEL_CLASSES:
        return SMOOTHED_MODEL_CLASSES[family]
    if family in TOWER_FAMILIES and not config.model_type.startswith(SMOOTHED_PREFIX):
        return None
    what = f"`{name}` is a `{config.model_type}` checkpoint" if name is not None else f"`{config.model_type}`"
    raise ValueError(
        f"{what}: unsupported model type. Supported: the MLLMs {sorted(SMOOTHED_MODEL_CLASSES)} (loaded as their "
        f"smoothed class) and the vision encoders {sorted(set(TOWER_FAMILIES) - set(SMOOTHED_MODEL_CLASSES))} "
        "(loaded as a `SmoothedVisionTower`)."
    )


__all__ = ["SMOOTHED_MODEL_CLASSES", "register_smoothed_model", "smoothed_class_for", "smoothed_family"]
