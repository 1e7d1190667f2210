"""Shared machinery of the smoothed MLLM model types (`smoothed_llava`, `smoothed_qwen2_vl`, ...)."""

import json
import os

from transformers import AutoConfig, AutoModelForImageTextToText, PreTrainedConfig, PreTrainedModel
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.utils import cached_file

from ..booster import load_booster
from ..configuration_feature_smoothing import FeatureSmoothingConfig
from ..logging_utils import get_logger
from ..modeling_smoothed_tower import SmoothedVisionTower


logger = get_logger(__name__)


def _processor_stats(path: str | os.PathLike, **hub_kwargs) -> dict:
    """`image_mean` / `image_std` from the checkpoint's `preprocessor_config.json`, when it has one."""
    try:
        file = cached_file(str(path), "preprocessor_config.json", _raise_exceptions_for_missing_entries=False,
                           **hub_kwargs)
    except OSError:
        file = None
    if file is None:
        return {}
    with open(file) as f:
        data = json.load(f)
    return {k: data[k] for k in ("image_mean", "image_std") if k in data}


class FeatureSmoothingMixin:
    """
    Mixed into a stock `*ForConditionalGeneration` class: after `__init__` the model's vision features are smoothed
    (see [`SmoothedVisionTower`]). The smoothing parameters live in `config.feature_smoothing`, so
    `save_pretrained` / `from_pretrained` round-trip them through `config.json`.

    `SmoothedXxx.from_pretrained(stock_checkpoint, smoothing=FeatureSmoothingConfig(...))` wraps a stock checkpoint;
    the processor's mean/std are read from its `preprocessor_config.json` unless the config sets them. A
    `booster` named in the config is loaded as a PEFT adapter.
    """

    def _init_feature_smoothing(self) -> None:
        smoothing = FeatureSmoothingConfig.from_dict(self.config.feature_smoothing or {})
        self.config.feature_smoothing = smoothing.to_dict()
        # not a registered submodule: the state dict and `modules()` stay exactly the stock model's
        object.__setattr__(self, "smoothed_vision_tower", SmoothedVisionTower(self, smoothing).install())

    @property
    def smoothing_config(self) -> FeatureSmoothingConfig:
        return self.smoothed_vision_tower.config

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, smoothing=None, **kwargs):
        if smoothing is not None:
            hub = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs}
            smoothing = FeatureSmoothingConfig.from_dict(smoothing)
            if smoothing.image_mean is None or smoothing.image_std is None:
                stats = _processor_stats(pretrained_model_name_or_path, **hub)
                given = {k: v for k, v in smoothing.to_dict().items() if v is not None}
                smoothing = FeatureSmoothingConfig.from_dict({**stats, **given})
            if "config" not in kwargs:
                kwargs["config"] = cls._smoothed_config(pretrained_model_name_or_path, smoothing, hub)
            else:
                kwargs["feature_smoothing"] = smoothing.to_dict()
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        if model.smoothing_config.booster:
            hub = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs}
            load_booster(model, model.smoothing_config.booster, **hub)
        return loaded

    def save_pretrained(self, save_directory, *args, certificates=None, dataset_name: str = "custom images",
                        dataset_type: str | None = None, repo_id: str | None = None, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus a `README.md` model card (from the package template) with the
        smoothing parameters and, when `certificates` are given, their aggregates in `model-index` metadata."""
        from ..hub.sharing import save_certified

        if kwargs.pop("_card", True) is False:
            return super().save_pretrained(save_directory, *args, **kwargs)
        return save_certified(self, save_directory, certificates=certificates, repo_id=repo_id,
                              dataset_name=dataset_name, dataset_type=dataset_type, _card=False, **kwargs)

    def push_to_hub(self, repo_id: str, *, certificates=None, dataset_name: str = "custom images", **kwargs):
        """Upload weights, config and the certified model card in one commit (see `push_certified_to_hub`); unlike
        the stock `push_to_hub`, the card written by `save_pretrained` is kept."""
        from ..hub.sharing import push_certified_to_hub

        return push_certified_to_hub(self, repo_id, certificates=certificates, dataset_name=dataset_name, **kwargs)

    @classmethod
    def _smoothed_config(cls, path, smoothing: FeatureSmoothingConfig, hub: dict) -> PreTrainedConfig:
        """The checkpoint's (stock or smoothed) config as this class's config, with `smoothing` set."""
        stock = AutoConfig.from_pretrained(path, **hub)
        expected = cls.config_class.model_type
        if stock.model_type not in (expected, expected.removeprefix("smoothed_")):
            raise ValueError(
                f"`{path}` is a `{stock.model_type}` checkpoint but {cls.__name__} wraps "
                f"`{expected.removeprefix('smoothed_')}`; use the class from `hf_feature_smoothing.SMOOTHED_MODEL_CLASSES` "
                f"for `{stock.model_type}`."
            )
        data = {k: v for k, v in stock.to_dict().items() if k not in ("model_type", "transformers_version")}
        return cls.config_class(**{**data, "feature_smoothing": smoothing.to_dict()})


def register_smoothed_model(config_cls: type[PreTrainedConfig], model_cls: type[PreTrainedModel]) -> None:
    """Register a smoothed model type with the Auto classes and reuse the stock checkpoint key mapping (without it,
    `lm_head` would be silently re-initialised when loading a stock checkpoint)."""
    AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
    AutoModelForImageTextToText.register(config_cls, model_cls, exist_ok=True)
    stock_cls = next(c for c in model_cls.__mro__[1:] if c.__module__.startswith("transformers."))
    mapping = get_checkpoint_conversion_mapping(stock_cls.__name__) or get_checkpoint_conversion_mapping(
        config_cls.model_type.removeprefix("smoothed_")
    )
    if mapping is not None:
        try:
            register_checkpoint_conversion_mapping(model_cls.__name__, mapping)
        except ValueError:  # already registered (module re-imported)
            pass
