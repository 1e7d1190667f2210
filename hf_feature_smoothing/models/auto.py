"""What `import hf_feature_smoothing` adds to transformers' loading, besides registering the model types:

* `AutoModelForImageTextToText.from_pretrained(repo, smoothing=...)` loads the smoothed model type of the checkpoint's
  family (a stock or smoothed checkpoint alike) with those smoothing overrides, instead of a `TypeError`;
* a local folder whose save was killed mid-swap is rolled back to the previous checkpoint before loading;
* a config whose `model_type` is stock but which carries a `feature_smoothing` block (e.g. `model_type` edited back,
  or a stock config that was given the block) loads an **unsmoothed** stock model: that is now said, with the fix.
"""

import contextlib
import contextvars
import functools
from collections.abc import Iterator

from transformers import AutoConfig, AutoModelForImageTextToText, PreTrainedConfig

from ..smoothing.towers import TOWER_FAMILIES
from ..utils.atomic import recover_if_local
from ..utils.logging import get_logger
from .registry import SMOOTHED_MODEL_CLASSES, smoothed_class_for


logger = get_logger(__name__)

_OWN_LOAD: contextvars.ContextVar[bool] = contextvars.ContextVar("hf_fs_own_load", default=False)
CONFIG_KWARGS = ("revision", "subfolder", "cache_dir", "token", "local_files_only", "force_download", "proxies",
                 "trust_remote_code")


def smoothing_argument(smoothing, kwargs: dict):
    """The smoothing overrides of a `from_pretrained` call: `smoothing_config=` (transformers' `*_config=` naming, as
    `quantization_config=`) or its alias `smoothing=`, popped from `kwargs`; both at once is an error."""
    if "smoothing_config" not in kwargs:
        return smoothing
    alias = kwargs.pop("smoothing_config")
    if smoothing is not None and alias is not None:
        raise ValueError("Pass the smoothing overrides once: `smoothing_config=` or its alias `smoothing=`, not both.")
    return alias if alias is not None else smoothing


@contextlib.contextmanager
def loading_smoothed_checkpoint() -> Iterator[None]:
    """Inside the block, configs are read by a smoothed class that honours `feature_smoothing`: no warning."""
    token = _OWN_LOAD.set(True)
    try:
        yield
    finally:
        _OWN_LOAD.reset(token)


def _warn_if_stock_with_smoothing(cls, config_dict: dict) -> None:
    model_type = config_dict.get("model_type") or getattr(cls, "model_type", "")
    honoured = str(getattr(cls, "model_type", "")).startswith("smoothed_") or str(model_type).startswith("smoothed_")
    if _OWN_LOAD.get() or not config_dict.get("feature_smoothing") or honoured:
        return
    fix = (f"set `\"model_type\": \"smoothed_{model_type}\"` in config.json, or load it with "
           f"`hf_feature_smoothing.SMOOTHED_MODEL_CLASSES[\"{model_type}\"].from_pretrained(...)`"
           if model_type in TOWER_FAMILIES else "load it with a smoothed model class")
    logger.warning(
        f"This `{model_type}` config has a `feature_smoothing` block, but `{model_type}` is a stock model type: it "
        f"loads as a stock model WITHOUT smoothing. To load it smoothed, {fix}."
    )


def _patch_config_from_dict() -> None:
    original = PreTrainedConfig.from_dict.__func__
    if getattr(original, "_hf_fs_patched", False):
        return

    @functools.wraps(original)
    def from_dict(cls, config_dict, **kwargs):
        _warn_if_stock_with_smoothing(cls, config_dict)
        return original(cls, config_dict, **kwargs)

    from_dict._hf_fs_patched = True
    PreTrainedConfig.from_dict = classmethod(from_dict)


def _patch_auto_model() -> None:
    original = AutoModelForImageTextToText.from_pretrained.__func__
    if getattr(original, "_hf_fs_patched", False):
        return

    @functools.wraps(original)
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        recover_if_local(pretrained_model_name_or_path)  # a save killed between its two renames is rolled back
        smoothing = smoothing_argument(kwargs.pop("smoothing", None), kwargs)
        if smoothing is None:
            return original(cls, pretrained_model_name_or_path, *model_args, **kwargs)
        config = kwargs.pop("config", None)
        if config is None or isinstance(config, str):
            with loading_smoothed_checkpoint():
                config = AutoConfig.from_pretrained(config or pretrained_model_name_or_path,
                                                    **{k: kwargs[k] for k in CONFIG_KWARGS if k in kwargs})
        try:
            model_cls = smoothed_class_for(config)
        except ValueError:  # unsupported: the same message as for an encoder (`smoothing=` needs an MLLM)
            model_cls = None
        if model_cls is None:
            raise ValueError(
                f"`smoothing=` needs a model type with a smoothed class ({sorted(SMOOTHED_MODEL_CLASSES)}), but "
                f"`{pretrained_model_name_or_path}` is `{config.model_type}`. For a stand-alone encoder use "
                "`SmoothedVisionTower.from_pretrained(repo, smoothing=...)`."
            )
        kwargs.pop("trust_remote_code", None)
        return model_cls.from_pretrained(
            pretrained_model_name_or_path, *model_args, config=config, smoothing=smoothing, **kwargs)

    from_pretrained._hf_fs_patched = True
    AutoModelForImageTextToText.from_pretrained = classmethod(from_pretrained)


_patch_config_from_dict()
_patch_auto_model()
