"""The built-in model and booster aliases, listed once, and `resolve_model`: the one resolver behind `hf-fs --model /
--booster`, the benchmarks and the examples.

`resolve_model(name, booster=None, smoothing_config=None)` loads an alias of [`MODEL_ALIASES`] or, for anything else
(a local folder or Hub repo id), falls back to [`~models.loading.load_smoothed`]; then loads the booster: an alias of
[`BOOSTER_ALIASES`] (its shipped folder), or a folder / Hub repo id.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from huggingface_hub import try_to_load_from_cache
from torch import nn

from ..booster import load_booster
from ..models import make_smoothed
from ..models.loading import load_smoothed
from ..smoothing.configuration_feature_smoothing import FeatureSmoothingConfig
from ..smoothing.modeling_smoothed_tower import SmoothedVisionTower
from ..testing_utils import TINY_FAMILIES, tiny_model
from ..utils.names import looks_like_path
from .llava_booster_training import LLAVA_BOOSTER
from .llava_dinov2_smollm2 import MODEL_NAME as LLAVA_NAME
from .llava_dinov2_smollm2 import install_in_hub_cache, llava_checkpoint
from .real_data import load_dinov2_small


@dataclass(frozen=True)
class ModelAlias:
    """A built-in `--model` name: what it is, and how it loads (`load(smoothing_config)`)."""

    description: str
    load: Callable[..., nn.Module]


def _dinov2_s14(smoothing_config=None) -> nn.Module:
    model = load_dinov2_small()  # the stock encoder, with the processor statistics it was trained with
    if smoothing_config is None:
        return model
    return SmoothedVisionTower(model, smoothing_config).eval()


def _llava_dinov2_smollm2(smoothing_config=None) -> nn.Module:
    """Assembled offline and loaded through the Hub cache, as any checkpoint (its smoothed type)."""
    return load_smoothed(install_in_hub_cache(llava_checkpoint()), smoothing_config, local_files_only=True)


def _tiny(family: str, smoothing_config=None) -> nn.Module:
    model = tiny_model(family)  # a stock MLLM with random weights
    if smoothing_config is None:
        return model
    return make_smoothed(model, FeatureSmoothingConfig.from_dict(smoothing_config))


MODEL_ALIASES: dict[str, ModelAlias] = {
    "dinov2-s14": ModelAlias("real DINOv2-S/14, offline", _dinov2_s14),
    LLAVA_NAME: ModelAlias("the real-weight LLaVA, assembled offline", _llava_dinov2_smollm2),
    **{f"tiny-{family}": ModelAlias("random, for smoke runs", partial(_tiny, family)) for family in TINY_FAMILIES},
}

SHIPPED_BOOSTER = f"{LLAVA_NAME}-gsb"
# built-in `--booster` name -> (what it is, its shipped adapter folder)
BOOSTER_ALIASES: dict[str, tuple[str, Path]] = {
    SHIPPED_BOOSTER: (f"the booster shipped for {LLAVA_NAME}", LLAVA_BOOSTER),
}


def model_aliases_help() -> str:
    """The aliases of [`MODEL_ALIASES`] for a help string (the `tiny-*` ones folded into `tiny-<a|b|...>`)."""
    parts, tiny = [], [name.removeprefix("tiny-") for name in MODEL_ALIASES if name.startswith("tiny-")]
    for name, alias in MODEL_ALIASES.items():
        if not name.startswith("tiny-"):
            parts.append(f"`{name}` ({alias.description})")
    if tiny:
        parts.append(f"`tiny-<{'|'.join(tiny)}>` ({MODEL_ALIASES['tiny-' + tiny[0]].description})")
    return ", ".join(parts)


def resolve_booster_path(booster: str | os.PathLike | None) -> str | os.PathLike | None:
    """A booster alias of [`BOOSTER_ALIASES`] → its shipped folder (as `str`); anything else as given."""
    if isinstance(booster, str) and booster in BOOSTER_ALIASES:
        return str(BOOSTER_ALIASES[booster][1])
    return booster


ADAPTER_CONFIG = "adapter_config.json"


def _is_adapter(name: str) -> bool:
    """`name` is a booster adapter (a local folder, or a Hub repo in the offline cache, with `adapter_config.json`)
    and no model config."""
    if os.path.isdir(name):
        return os.path.isfile(os.path.join(name, ADAPTER_CONFIG)) and not os.path.isfile(os.path.join(name, "config.json"))
    try:
        found = try_to_load_from_cache(name, ADAPTER_CONFIG)
    except ValueError:  # not a repo id
        return False
    return isinstance(found, str)


def check_model_name(name: str, label: str = "`model`") -> None:
    """Refuse, before anything loads, what cannot be a model: a local path that does not exist (not "a malformed
    repo id"), a file, or a booster adapter (to be passed as the booster). `label` names the argument
    (`--model`)."""
    if name in MODEL_ALIASES:
        return
    path = Path(name).expanduser()
    if not path.exists() and looks_like_path(name):
        raise ValueError(f"{label} {name}: the folder {os.path.abspath(path)} does not exist; pass an existing model folder, a Hub repo "
                         f"id (`org/name`), or a built-in alias ({', '.join(sorted(MODEL_ALIASES))}).")
    if path.is_file():
        raise ValueError(f"{label} {name}: is a file; pass the model's folder (with config.json) or a Hub repo id.")
    if _is_adapter(str(path) if path.exists() else name):
        raise ValueError(f"{label} {name}: is a booster adapter ({ADAPTER_CONFIG}), not a model; pass it as "
                         f"--booster / `booster=` {name}, with the model it was trained for as {label}.")


def load_model_alias(name: str, smoothing_config=None) -> nn.Module:
    """`name` as an alias of [`MODEL_ALIASES`], else through [`load_smoothed`] (a local folder or Hub repo id). A
    `tiny-*` name that is no alias, or a name that is neither a local path nor a loadable repo, fails naming the
    aliases."""
    if name in MODEL_ALIASES:
        return MODEL_ALIASES[name].load(smoothing_config)
    if name.startswith("tiny-"):
        raise ValueError(f"Unknown model alias `{name}`; the built-in ones are {sorted(MODEL_ALIASES)}.")
    check_model_name(name)
    try:
        return load_smoothed(name, smoothing_config)
    except OSError as error:
        if "/" in name or os.path.exists(name):
            raise
        raise OSError(f"{error} (`{name}` is no built-in alias either: {sorted(MODEL_ALIASES)})") from error


def attach_booster(model: nn.Module, booster: str | os.PathLike) -> nn.Module:
    """Load the booster `booster` (an alias of [`BOOSTER_ALIASES`], a folder or a Hub repo id) into `model`."""
    return load_booster(model, resolve_booster_path(booster))


def resolve_model(name: str, booster: str | os.PathLike | None = None, smoothing_config=None) -> nn.Module:
    """
    The model `name` names, with the booster `booster` loaded into it.

    Args:
        name (`str`):
            An alias of [`MODEL_ALIASES`] (`dinov2-s14`, `llava-dinov2-smollm2`, `tiny-<family>`), or a local folder
            / Hub repo id of a supported model (an MLLM loads as its smoothed class, a stand-alone encoder as a
            `SmoothedVisionTower`, see [`load_smoothed`]).
        booster (`str` or `os.PathLike`, *optional*):
            An alias of [`BOOSTER_ALIASES`] (`llava-dinov2-smollm2-gsb`), a folder or a Hub repo id.
        smoothing_config (`dict` or `FeatureSmoothingConfig`, *optional*):
            Smoothing overrides. Without them, `dinov2-s14` and `tiny-<family>` are the stock models (as `hf-fs`
            loads them); with them, smoothed.
    """
    model = load_model_alias(name, smoothing_config)
    if booster:
        attach_booster(model, booster)
    return model


__all__ = ["BOOSTER_ALIASES", "MODEL_ALIASES", "SHIPPED_BOOSTER", "ModelAlias", "attach_booster", "check_model_name",
           "load_model_alias", "model_aliases_help", "resolve_booster_path", "resolve_model"]
