"""`load_smoothed`: the one class dispatcher from a model id or folder to its smoothed model. The config is read once
and [`smoothed_class_for`] (the decision the Auto `smoothing=` path and `SmoothedVisionTower.from_pretrained` also
use) picks the class: a supported MLLM (stock or smoothed checkpoint) loads as its `Smoothed*` class, a stand-alone
vision encoder as a `SmoothedVisionTower`; anything else is a `ValueError` naming the supported model types."""

from transformers import AutoConfig

from ..smoothing.modeling_smoothed_tower import SmoothedVisionTower
from ..utils.atomic import recover_if_local
from . import tower_pretrained  # noqa: F401  (registers SmoothedVisionTower.from_pretrained)
from .auto import CONFIG_KWARGS, loading_smoothed_checkpoint
from .registry import smoothed_class_for


def load_smoothed(name_or_path, smoothing_config=None, **hub_kwargs):
    """
    Load `name_or_path` (a local folder or Hub repo id) smoothed, in eval mode.

    Args:
        name_or_path (`str` or `os.PathLike`):
            A checkpoint of a supported MLLM (stock or smoothed) or stand-alone vision encoder.
        smoothing_config (`dict` or `FeatureSmoothingConfig`, *optional*):
            Overrides of the checkpoint's smoothing (or of the defaults, for a stock checkpoint).
        hub_kwargs:
            As for `from_pretrained`: `revision=`, `cache_dir=`, `local_files_only=`, `token=`, ...

    Returns:
        The `Smoothed*` MLLM (see `SMOOTHED_MODEL_CLASSES`) or a `SmoothedVisionTower`.
    """
    recover_if_local(name_or_path)
    with loading_smoothed_checkpoint():
        config = AutoConfig.from_pretrained(name_or_path, **{k: hub_kwargs[k] for k in CONFIG_KWARGS if k in hub_kwargs})
    model_cls = smoothed_class_for(config, name_or_path)
    if model_cls is None:
        return SmoothedVisionTower.from_pretrained(name_or_path, smoothing=smoothing_config, **hub_kwargs).eval()
    hub_kwargs.pop("trust_remote_code", None)
    smoothing = smoothing_config if smoothing_config is not None else {}
    return model_cls.from_pretrained(name_or_path, config=config, smoothing=smoothing, **hub_kwargs).eval()


__all__ = ["load_smoothed"]
