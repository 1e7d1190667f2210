"""Shared machinery of the smoothed MLLM model types (`smoothed_llava`, `smoothed_qwen2_vl`, ...)."""

import copy
import os

from transformers import AutoConfig, PreTrainedConfig, PreTrainedModel

from ..smoothing.configuration_feature_smoothing import FeatureSmoothingConfig
from ..smoothing.hub_io import hub_io
from ..smoothing.modeling_smoothed_tower import SmoothedVisionTower
from ..smoothing.towers.processor import HUB_KWARGS, read_processor_settings, resolve_pixel_stats
from ..utils.atomic import recover_if_local
from ..utils.logging import get_logger
from ..utils.tensors import check_finite, reading_safetensors
from .auto import loading_smoothed_checkpoint, smoothing_argument
from .booster_support import booster_support, booster_to_save
from .registry import SMOOTHED_MODEL_CLASSES, register_smoothed_model


logger = get_logger(__name__)

BOOSTER_HUB_KWARGS = ("cache_dir", "token", "local_files_only", "force_download", "proxies")
CORRUPT_WEIGHTS_FIX = ("Download it again (`force_download=True` for a Hub repo), or re-save it with `save_pretrained` "
                       "from a healthy model.")


def fill_processor_settings(smoothing: FeatureSmoothingConfig, path, family: str, **hub_kwargs) -> None:
    """Fill the statistics / resize settings `smoothing` lacks from the checkpoint's processor config (see
    [`read_processor_settings`]), else the `family` default statistics (with a warning), through
    [`~towers.processor.resolve_pixel_stats`]."""
    missing = [k for k in ("image_mean", "image_std", "image_processor") if getattr(smoothing, k) is None]
    if not missing:
        return
    settings = read_processor_settings(path, **hub_kwargs)
    if smoothing.image_processor is None and "image_processor" in settings:
        smoothing.update({"image_processor": settings["image_processor"]})
    if smoothing.image_mean is None or smoothing.image_std is None:
        stats = resolve_pixel_stats(family, smoothing.image_mean, smoothing.image_std, settings=settings, path=path)
        smoothing.update({"image_mean": stats.mean, "image_std": stats.std})


def make_smoothed(model: PreTrainedModel, smoothing: FeatureSmoothingConfig) -> PreTrainedModel:
    """Turn a stock supported MLLM into its smoothed model type, in place (same weights, same modules)."""
    family = model.config.model_type
    cls = SMOOTHED_MODEL_CLASSES[family]
    model.config.__class__ = cls.config_class
    model.config.feature_smoothing = smoothing
    model.__class__ = cls
    model._init_feature_smoothing()
    return model


def make_stock(model: PreTrainedModel, stock_class: type, stock_config_class: type) -> PreTrainedModel:
    """Undo [`make_smoothed`] in place (a failed load's rollback): the smoothing hooks removed, the stock classes
    back, no `feature_smoothing` in the config."""
    model.smoothed_vision_tower.remove()
    del model.__dict__["smoothed_vision_tower"]
    model.__class__ = stock_class
    model.config.__class__ = stock_config_class
    model.config.__dict__.pop("feature_smoothing", None)
    return model


def check_loaded_weights(model: PreTrainedModel, info: dict, path) -> None:
    """After `from_pretrained`: booster keys must match the booster the config describes exactly (transformers would
    re-initialise missing ones), every tensor must be finite; weights are re-owned at aligned addresses."""
    booster_keys = {
        kind: sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(kind, ())
                     if booster_support().parameter_prefix in str(k) or ".base_layer." in str(k))
        for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
    }
    if any(booster_keys.values()):
        raise ValueError(
            f"The weights of `{path}` do not match the booster its config.json describes "
            f"(`feature_smoothing.booster_config`): missing keys {booster_keys['missing_keys']}, unexpected "
            f"(renamed or extra) keys {booster_keys['unexpected_keys']}, mismatched "
            f"{booster_keys['mismatched_keys']}. Re-save the model with `save_pretrained`."
        )
    check_finite(model.state_dict(), f"`{path}`")
    for param in model.parameters():
        # weights loaded as views into the file buffer sit at unaligned offsets, where BLAS kernels round
        # differently: own, aligned copies make outputs bit-identical to the model that was saved
        if param.device.type == "cpu" and param.data_ptr() % 64:
            param.data = param.data.clone()


class FeatureSmoothingMixin:
    """
    Mixed into a stock `*ForConditionalGeneration` class: after `__init__` the model's vision features are smoothed
    (see [`SmoothedVisionTower`]). The smoothing parameters are one [`FeatureSmoothingConfig`] object:
    `model.config.feature_smoothing`, `model.smoothing_config` and `model.smoothed_vision_tower.config` are the same
    object, so editing any of them edits all, and `save_pretrained` writes it to `config.json` and the model card.

    `SmoothedXxx.from_pretrained(checkpoint, smoothing=...)` wraps a stock checkpoint or reloads a smoothed one;
    `smoothing` overrides only the fields it sets (a dict: its keys; a `FeatureSmoothingConfig`: the fields that
    differ from the defaults). The processor's mean/std and resize settings are read from the checkpoint's
    `processor_config.json` / `preprocessor_config.json` unless the config has them. A model with a booster saves
    its full weights, booster included, and reloads with it, offline.
    """

    def _init_feature_smoothing(self) -> None:
        if not isinstance(self.config.feature_smoothing, FeatureSmoothingConfig):
            self.config.feature_smoothing = FeatureSmoothingConfig()
        smoothing = self.config.feature_smoothing
        # not a registered submodule: the state dict and `modules()` stay exactly the stock model's
        object.__setattr__(self, "smoothed_vision_tower", SmoothedVisionTower(self, smoothing).install())
        if smoothing.booster_config is not None:
            self._attach_saved_booster(smoothing.booster_config)

    def _attach_saved_booster(self, saved: dict) -> None:
        """Re-create the booster layers whose weights `save_pretrained` wrote into the model's own weights."""
        support = booster_support()
        config = support.config_from_dict(saved["config"])
        config.inference_mode = True
        support.inject(self, config, saved["adapter_name"])  # not `self.add_adapter`: peft>=0.22 on transformers>=5.24

    @property
    def smoothing_config(self) -> FeatureSmoothingConfig:
        """The live smoothing parameters (the object in `config.feature_smoothing`); assigning updates it in place."""
        return self.config.feature_smoothing

    @smoothing_config.setter
    def smoothing_config(self, value: FeatureSmoothingConfig | dict) -> None:
        self.config.feature_smoothing = value

    # ----- loading ------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, smoothing=None, **kwargs):
        """
        `PreTrainedModel.from_pretrained` for a stock or smoothed checkpoint, with:

        Args:
            smoothing_config (`dict` or `FeatureSmoothingConfig`, *optional*):
                Overrides of the checkpoint's smoothing (or of the defaults, for a stock checkpoint): only the fields
                it sets change. `{"booster": "org/gsb"}` loads that booster (replacing a saved one). `smoothing=` is
                an alias.
            kwargs:
                As for transformers: `config=`, `subfolder=`, `revision=`, `cache_dir=`, `output_loading_info=`, ...
                (the booster is loaded with `cache_dir` / `token` / `local_files_only`, not the model's revision).

        Weights are checked after loading: booster keys must match the booster in the config exactly, and every
        tensor must be finite (errors name the file and the tensor).
        """
        path = pretrained_model_name_or_path
        recover_if_local(path)
        smoothing = smoothing_argument(smoothing, kwargs)
        hub = {k: kwargs[k] for k in HUB_KWARGS if kwargs.get(k) is not None}
        overrides = FeatureSmoothingConfig.overrides(smoothing)
        kwargs["config"], replace_booster = cls._smoothed_config(path, kwargs.get("config"), overrides, hub)
        smoothing = kwargs["config"].feature_smoothing
        to_load = smoothing.booster if replace_booster or smoothing.booster_config is None else None
        if smoothing.booster_config is None:
            smoothing.booster = None  # named once it is attached (below): the config never claims a missing booster
        want_info = kwargs.pop("output_loading_info", False)
        with reading_safetensors(path, CORRUPT_WEIGHTS_FIX):
            model, info = super().from_pretrained(path, *model_args, output_loading_info=True, **kwargs)
        check_loaded_weights(model, info, path)
        if replace_booster and model.smoothing_config.booster_config is not None:
            booster_support().remove(model)  # the saved booster, replaced by the one named in `smoothing`
        if to_load:
            booster_support().load(model, to_load, **{k: kwargs[k] for k in BOOSTER_HUB_KWARGS if kwargs.get(k) is not None})
        return (model, info) if want_info else model

    @classmethod
    def _smoothed_config(cls, path, config, overrides: dict, hub: dict) -> tuple[PreTrainedConfig, bool]:
        """The checkpoint's (stock or smoothed) config, or the `config` given, as this class's config with the
        saved smoothing updated by `overrides` and completed from the processor config; and whether the overrides
        replace a booster saved in the weights."""
        expected = cls.config_class.model_type
        family = expected.removeprefix("smoothed_")
        if config is None or isinstance(config, (str, os.PathLike)):
            with loading_smoothed_checkpoint():  # no "stock model_type" warning: this class honours the block
                config = AutoConfig.from_pretrained(path if config is None else config, **hub)
        else:
            config = copy.deepcopy(config)  # never edit the caller's object
        if config.model_type not in (expected, family):
            raise ValueError(
                f"`{path}` is a `{config.model_type}` checkpoint but {cls.__name__} wraps `{family}`; use the class "
                f"from `hf_feature_smoothing.SMOOTHED_MODEL_CLASSES` for `{config.model_type}`."
            )
        saved = getattr(config, "feature_smoothing", None)
        saved = FeatureSmoothingConfig.from_dict(saved).to_dict() if saved is not None else {}
        replace_booster = saved.get("booster_config") is not None and "booster" in overrides and (
            overrides["booster"] != saved.get("booster"))
        smoothing = FeatureSmoothingConfig.from_dict({**saved, **overrides})
        fill_processor_settings(smoothing, path, family, **hub)
        if isinstance(config, cls.config_class):
            config.feature_smoothing = smoothing
            return config, replace_booster
        data = {k: v for k, v in config.to_dict().items()
                if k not in ("model_type", "transformers_version", "feature_smoothing")}
        return cls.config_class(**data, feature_smoothing=smoothing), replace_booster

    # ----- saving -------------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory, *, certificates=None, dataset_name: str = "custom images",
                        dataset_type: str | None = None, repo_id: str | None = None, push_to_hub: bool = False,
                        **kwargs):
        """
        `PreTrainedModel.save_pretrained`, atomically (a temporary sibling folder swapped in whole: a crash leaves the
        previous checkpoint or the new one), plus a `README.md` model card generated from the live smoothing config
        with, when `certificates` are given, their aggregates in `model-index` metadata. A booster in the model is
        saved *in* the weights (`config.json` records it under `feature_smoothing.booster_config`), so the folder
        reloads smoothed and boosted with `AutoModelForImageTextToText.from_pretrained`, offline.

        `push_to_hub=True` uploads the folder (card included) after it is written; `repo_id`, `commit_message`,
        `commit_description`, `private`, `token`, `revision`, `create_pr`, `tags` and `api` go to the upload.
        """
        return hub_io("save_with_card")(self, save_directory, certificates=certificates, repo_id=repo_id,
                              dataset_name=dataset_name, dataset_type=dataset_type, push_to_hub=push_to_hub, **kwargs)

    def _save_pretrained_raw(self, save_directory, **kwargs) -> None:
        """Config and full weights (booster included) into `save_directory`, no card."""
        support = booster_support()
        smoothing = self.smoothing_config
        name = booster_to_save(self, smoothing.booster)
        smoothing.booster_config = None if name is None else {
            "adapter_name": name, "config": support.config_dict(self.peft_config[name])}
        peft_loaded = getattr(self, "_hf_peft_config_loaded", False)
        self._hf_peft_config_loaded = False  # full weights, not transformers' adapter-only save
        try:
            super().save_pretrained(save_directory, **kwargs)
        finally:
            self._hf_peft_config_loaded = peft_loaded

    def push_to_hub(self, repo_id: str, *, certificates=None, dataset_name: str = "custom images",
                    dataset_type: str | None = None, **kwargs):
        """Upload weights, config and the certified model card in one commit (see `push_certified_to_hub`). Takes
        the stock arguments (`commit_message`, `commit_description`, `private`, `token`, `revision`, `create_pr`,
        `max_shard_size`, `tags`, `safe_serialization`) and `api` (an `HfApi`, e.g. with another endpoint)."""
        return hub_io("push_with_card")(self, repo_id, certificates=certificates, dataset_name=dataset_name,
                                     dataset_type=dataset_type, **kwargs)


__all__ = ["FeatureSmoothingMixin", "check_loaded_weights", "fill_processor_settings", "make_smoothed", "make_stock", "register_smoothed_model"]
