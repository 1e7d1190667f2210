"""Loading boosters strictly: a booster file whose keys do not match the booster (missing, renamed or extra layers,
or an empty state dict) or whose values are not finite fails with an error naming the file and the keys, on every
path (`load_booster`, `PeftModel.from_pretrained`, `AutoPeftModel`, a smoothed model's `smoothing={"booster": ...}`
and its saved weights). A booster only acts under smoothing, so attaching one to an unsmoothed MLLM restores the
smoothing recorded in its `adapter_config.json`."""

import contextlib
import contextvars
import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ..models.booster_support import BoosterSupport
from ..models.modeling_smoothed import make_smoothed, make_stock
from ..models.registry import SMOOTHED_MODEL_CLASSES
from ..smoothing.configuration_feature_smoothing import FeatureSmoothingConfig
from ..smoothing.towers import base_model_type
from ..utils.logging import get_logger
from ..utils.tensors import check_finite, reading_safetensors
from .configuration_booster import GSBConfig
from .layer import GSBLayer, booster_layers, booster_names, unwrap_boosters
from .registration import DEFAULT_ADAPTER_NAME, PARAMETER_PREFIX, PEFT_TYPE_NAME


logger = get_logger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
# fields of the smoothing config that describe *which* booster is attached, not the smoothing it was trained under
_BOOSTER_FIELDS = ("booster", "booster_config", "library_version")
_SOURCE: contextvars.ContextVar[str | None] = contextvars.ContextVar("booster_source", default=None)
_TOWER_SMOOTHS: contextvars.ContextVar[bool] = contextvars.ContextVar("tower_smooths", default=False)


@contextlib.contextmanager
def smoothing_applied_by_tower() -> Iterator[None]:
    """Inside the block, boosters are loaded for a `SmoothedVisionTower` that conditions them: nothing to restore."""
    token = _TOWER_SMOOTHS.set(True)
    try:
        yield
    finally:
        _TOWER_SMOOTHS.reset(token)


@contextlib.contextmanager
def booster_source(source: str | os.PathLike | None) -> Iterator[None]:
    """Name the file being loaded in the errors of [`check_booster_state_dict`] inside the block."""
    token = _SOURCE.set(None if source is None else str(source))
    try:
        yield
    finally:
        _SOURCE.reset(token)


def _is_booster_key(key: str, adapter_name: str) -> bool:
    """Whether `key` names a weight of booster `adapter_name` (its mapper or its purifier)."""
    return any(f".{PARAMETER_PREFIX}{part}.{adapter_name}." in key for part in ("mapper", "purifier"))


def check_booster_state_dict(model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor],
                             source: str | None = None) -> None:
    """
    Raise unless `state_dict` (keys already mapped to the model's) holds exactly the weights of booster
    `adapter_name` in `model`, all finite. Without this, PEFT loads with `strict=False`: missing layers keep their
    random initialisation and renamed or extra ones are dropped, with no error.
    """
    source = source or _SOURCE.get() or f"the `{ADAPTER_WEIGHTS}` of adapter `{adapter_name}`"
    expected = {k for k in model.state_dict() if _is_booster_key(k, adapter_name)}
    if not state_dict:
        raise ValueError(f"Booster weights {source} are empty: no tensor to load into adapter `{adapter_name}` "
                         f"(expected {len(expected)}: {sorted(expected)[:4]} ...).")
    missing = sorted(expected - set(state_dict))
    unexpected = sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ValueError(
            f"Booster weights {source} do not match the booster they are loaded into (adapter `{adapter_name}`): "
            f"missing keys {missing}, unexpected (renamed or extra) keys {unexpected}. Loading them would leave "
            "layers randomly initialised; use the file `save_pretrained` wrote for this booster."
        )
    check_finite(state_dict, source)


def booster_config_dict(config) -> dict:
    """A booster's PEFT config as a JSON-compatible dict (the content of `adapter_config.json`), without the
    location it was loaded into (`base_model_name_or_path`), which says nothing about the booster."""
    data = json.loads(json.dumps(config.to_dict(), default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
    data.pop("base_model_name_or_path", None)
    return data


def smoothing_record(smoothing: FeatureSmoothingConfig) -> dict:
    """The smoothing parameters a booster records (which booster is attached is left out)."""
    return {k: v for k, v in smoothing.to_dict().items() if k not in _BOOSTER_FIELDS}


def record_smoothing(config, model: nn.Module) -> None:
    """Record the smoothing of `model` (if it is smoothed) in the booster `config` (`adapter_config.json`)."""
    if callable(getattr(model, "get_base_model", None)):
        model = model.get_base_model()
    smoothing = getattr(getattr(model, "smoothed_vision_tower", None), "config", None)
    if smoothing is not None:
        config.smoothing = smoothing_record(smoothing)


def restore_smoothing(model: nn.Module, config) -> None:
    """
    A booster is the identity unless smoothing conditions it on σ. When a booster is *loaded* (not trained) into an
    unsmoothed supported MLLM (`PeftModel.from_pretrained(stock_model, booster)`, `AutoPeftModel`), turn the model
    into its smoothed model type with the smoothing recorded in the booster's config, and say so. On a stand-alone
    encoder (no language model to hook) the booster acts through `SmoothedVisionTower` / `certify`: warn.
    """
    if not config.inference_mode or hasattr(model, "smoothed_vision_tower") or _TOWER_SMOOTHS.get():
        return
    family = base_model_type(model)
    if family not in SMOOTHED_MODEL_CLASSES:
        logger.warning(
            f"Booster loaded into an unsmoothed `{family}` encoder: it is the identity in this model's own forward "
            "(it acts only under Feature-space Smoothing). Use the model through `SmoothedVisionTower(model, "
            "FeatureSmoothingConfig(...))`, `certify(model, ...)` or `hf-fs`, which condition it on σ."
        )
        return
    recorded = config.smoothing is not None
    smoothing = FeatureSmoothingConfig.from_dict(config.smoothing or {"sigma": config.sigmas[0]})
    make_smoothed(model, smoothing)
    logger.warning(
        f"The booster acts only under Feature-space Smoothing, so this `{family}` model is now "
        f"{type(model).__name__} with the smoothing "
        + ("recorded in the booster's adapter_config.json" if recorded else
           f"σ={smoothing.sigma} (the booster records no smoothing; σ is its first training noise level)")
        + f" (σ={smoothing.sigma}, n={smoothing.num_samples}). Change it through `model.smoothing_config`."
    )


def remove_boosters(model: nn.Module) -> None:
    """Unwrap every booster layer of `model` (a model or a `SmoothedVisionTower`), probes included: the model is its
    un-boosted self again, and its smoothing config no longer names a booster (so a save → reload does not bring it
    back)."""
    unwrap_boosters(model)
    encoder = getattr(model, "encoder", None) if hasattr(model, "family") else None  # a SmoothedVisionTower
    for holder in (model, encoder):
        if holder is not None and "peft_config" in holder.__dict__:
            del holder.peft_config
    for holder in (model, encoder):
        if isinstance(holder, nn.Module) and hasattr(holder, "config"):
            holder._hf_peft_config_loaded = False
    tower = model if hasattr(model, "family") else getattr(model, "smoothed_vision_tower", None)
    smoothing = getattr(tower, "config", None)
    if isinstance(smoothing, FeatureSmoothingConfig):
        smoothing.booster, smoothing.booster_config = None, None


def activate_booster(model: nn.Module, adapter_name: str, inference_mode: bool = True) -> None:
    """Make booster `adapter_name` the active adapter of every booster layer of `model` (frozen in inference mode)."""
    layers = booster_layers(model)
    if not any(adapter_name in getattr(layer, part) for layer in layers for part in layer.adapter_layer_names):
        raise ValueError(f"`model` holds no booster `{adapter_name}`.")
    for layer in layers:
        layer.set_adapter(adapter_name, inference_mode=inference_mode)


def inject_booster(model: nn.Module, config, adapter_name: str = DEFAULT_ADAPTER_NAME) -> nn.Module:
    """
    Place the layers of booster `config` into `model` in place under `adapter_name` and make it the active adapter,
    through PEFT's own `inject_adapter_in_model` (transformers' `model.add_adapter` / `load_adapter` require a PEFT
    version that transformers >= 5.24 checks for and that is not released). The model records the booster the way
    transformers' adapter integration does (`model.peft_config`), so `save_pretrained` of a stand-alone model writes
    the adapter only, as it would after `model.add_adapter`. Weights are freshly initialised (identity boosters).
    """
    from peft import PeftConfig, inject_adapter_in_model

    if not isinstance(config, PeftConfig):
        raise TypeError(f"`config` must be a booster `PeftConfig`, got {type(config).__name__}.")
    existing = dict(getattr(model, "peft_config", None) or {})
    if adapter_name in existing:
        raise ValueError(f"`model` already holds an adapter named `{adapter_name}`; use another `adapter_name`.")
    config.base_model_name_or_path = model.__dict__.get("name_or_path", None)  # as transformers' `add_adapter`
    inject_adapter_in_model(config, model, adapter_name)
    model.peft_config = {**existing, **model.peft_config}  # PEFT's tuner keeps only the adapter it injected
    model._hf_peft_config_loaded = True
    activate_booster(model, adapter_name, inference_mode=bool(getattr(config, "inference_mode", False)))
    return model


def _resolve_booster_files(booster: str, hub: dict) -> tuple[str, str]:
    """Local paths of the booster's `adapter_config.json` and weights (a folder, or a Hub repo downloaded or read
    from the cache), both from the same revision of a repo; a missing one is named, with what a booster holds."""
    from peft.utils import CONFIG_NAME
    from transformers.utils import cached_file
    from transformers.utils.hub import extract_commit_hash

    def resolve(name: str, options: dict) -> str:
        try:
            return cached_file(booster, name, **options)
        except OSError as error:
            where = os.path.join(booster, options.get("subfolder") or "", name)
            raise FileNotFoundError(
                f"Cannot load the booster `{booster}`: no `{name}` ({where}). A booster folder holds "
                f"`{CONFIG_NAME}` and `{ADAPTER_WEIGHTS}`, as `save_pretrained` of a booster (or `hf-fs build "
                f"--booster`) writes them; check the path / repo id, or re-save the booster. ({error})"
            ) from error

    config_file = resolve(CONFIG_NAME, hub)
    commit = extract_commit_hash(config_file, None)
    weights_file = resolve(ADAPTER_WEIGHTS, {**hub, **({"revision": commit} if commit else {})})
    return config_file, weights_file


def read_booster_config(config_file: str):
    """The booster config in `config_file` (an `adapter_config.json`), refusing a file that is not a JSON object or
    describes another PEFT method (LoRA, ...) before anything touches the model."""
    from peft import PeftConfig

    try:
        with open(config_file) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"Cannot read the booster config `{config_file}`: it is not valid JSON ({error}). Re-download "
                         "it, or re-save the booster with `save_pretrained`.") from error
    if not isinstance(data, dict):
        raise ValueError(f"The booster config `{config_file}` must be a JSON object (an `adapter_config.json` as "
                         f"`save_pretrained` writes it), got a JSON {type(data).__name__}; re-save the booster.")
    peft_type = data.get("peft_type")
    if peft_type != PEFT_TYPE_NAME:
        raise ValueError(
            f"`{config_file}` has `peft_type` {peft_type!r}: it is not a Gaussian Smoothness Booster "
            f"(`peft_type` {PEFT_TYPE_NAME!r}). Load other PEFT adapters with `peft.PeftModel.from_pretrained`; "
            "`load_booster` takes booster folders written by `save_pretrained` of a booster."
        )
    return PeftConfig.from_pretrained(os.path.dirname(config_file))


def _load_weights(weights_file: str, source: str) -> dict[str, torch.Tensor]:
    """The tensors of a booster's weights file, refused (naming `source`) when unreadable or not finite."""
    from safetensors.torch import load_file

    with reading_safetensors(source, "Download the booster again (`force_download=True` for a Hub repo), or "
                                     "re-save it with `save_pretrained`."):
        state_dict = load_file(weights_file)
    check_finite(state_dict, source)
    return state_dict


@contextlib.contextmanager
def _restored_on_failure(model: nn.Module, adapter_name: str) -> Iterator[None]:
    """A failure inside the block leaves `model` as it was: the booster `adapter_name` is taken out again and a stock
    MLLM that [`restore_smoothing`] turned smoothed becomes its stock self (class, config, hooks)."""
    stock_class, stock_config_class = type(model), type(model.config)
    had_peft_config, peft_config = "peft_config" in model.__dict__, dict(getattr(model, "peft_config", None) or {})
    peft_loaded = model.__dict__.get("_hf_peft_config_loaded")
    held = booster_names(model)
    active = {name: list(layer.active_adapters) for name, layer in model.named_modules() if isinstance(layer, GSBLayer)}
    trainable = {name: param.requires_grad for name, param in model.named_parameters()}
    try:
        yield
    except BaseException:
        if not held:
            unwrap_boosters(model)
        elif adapter_name not in held:  # the other boosters stay: unwrap the layers this one added, leave the rest
            unwrap_boosters(model, only={name for name, layer in model.named_modules()
                                         if isinstance(layer, GSBLayer) and name not in active})
            for name, layer in model.named_modules():
                if isinstance(layer, GSBLayer):
                    layer.delete_adapter(adapter_name)
                    layer.set_adapter(active.get(name, layer.active_adapters))
        for name, param in model.named_parameters():  # PEFT's `set_adapter` makes active adapters trainable
            param.requires_grad_(trainable.get(name, param.requires_grad))
        if type(model) is not stock_class:
            make_stock(model, stock_class, stock_config_class)
        model.__dict__.pop("peft_config", None)
        if had_peft_config:
            model.peft_config = peft_config
        model.__dict__.pop("_hf_peft_config_loaded", None)
        if peft_loaded is not None:
            model._hf_peft_config_loaded = peft_loaded
        raise


def load_booster(model: nn.Module, booster: str | os.PathLike, adapter_name: str = DEFAULT_ADAPTER_NAME,
                 **hub_kwargs) -> nn.Module:
    """
    Load a booster adapter (local folder or Hub repo id) into `model` in place, through PEFT's own API
    (`inject_adapter_in_model` + `set_peft_model_state_dict`, the same code as `PeftModel.from_pretrained`), and
    make it the active adapter. The weights must match the booster exactly (see [`check_booster_state_dict`]).
    The files (present, readable, a booster's `adapter_config.json`, finite weights) are checked before the model is
    touched, and any later failure rolls it back: a failed load leaves `model` exactly as it was.

    Args:
        model (`PreTrainedModel`):
            A supported tower or MLLM (smoothed or stock; a stock MLLM becomes smoothed, see [`restore_smoothing`]).
        booster (`str` or `os.PathLike`):
            Folder or repo id with `adapter_config.json` and `adapter_model.safetensors`.
        adapter_name (`str`, *optional*, defaults to `"default"`):
            Name of the adapter inside the model.
        hub_kwargs:
            `revision`, `subfolder`, `token`, `cache_dir`, `local_files_only`, `force_download`, `proxies`, passed
            on to the Hub download.
    """
    from peft import set_peft_model_state_dict

    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"`model` must be a transformers model, got {type(model).__name__}.")
    hub = {k: v for k, v in hub_kwargs.items() if v is not None}
    unknown = sorted(set(hub) - {"revision", "subfolder", "token", "cache_dir", "local_files_only", "force_download",
                                 "proxies"})
    if unknown:
        raise TypeError(f"load_booster() got unexpected keyword arguments {unknown}.")
    source = os.path.join(str(booster), hub.get("subfolder") or "", ADAPTER_WEIGHTS)
    # everything that can be checked without the model, before it is touched
    config_file, weights_file = _resolve_booster_files(str(booster), hub)
    config = read_booster_config(config_file)
    config.inference_mode = True  # loaded to be used, as `PeftModel.from_pretrained` without `is_trainable`
    state_dict = _load_weights(weights_file, source)
    with _restored_on_failure(model, adapter_name):
        inject_booster(model, config, adapter_name)
        try:
            with booster_source(source):
                # strict: the tuner's key remapping runs `check_booster_state_dict` (missing / renamed / extra / empty)
                result = set_peft_model_state_dict(model, state_dict, adapter_name=adapter_name)
        except RuntimeError as error:  # `load_state_dict`: a tensor of another shape
            raise ValueError(f"Booster weights {source} do not match the booster they are loaded into (adapter "
                             f"`{adapter_name}`): {error}") from error
        missing = sorted(k for k in result.missing_keys if _is_booster_key(k, adapter_name))
        unexpected = sorted(result.unexpected_keys)
        if missing or unexpected:  # only reached with a PEFT whose tuners have no remapping hook
            raise ValueError(
                f"Booster weights {source} do not match the booster they are loaded into (adapter `{adapter_name}`): "
                f"missing keys {missing}, unexpected (renamed or extra) keys {unexpected}. Loading them would leave "
                "layers randomly initialised; use the file `save_pretrained` wrote for this booster."
            )
    model.eval()  # as transformers' `load_adapter` and `PeftModel.from_pretrained` leave a loaded adapter
    for layer in booster_layers(model):
        for param in layer.adapter_parameters(adapter_name):
            # own, aligned copies (never views into a file buffer): outputs stay bit-identical to the saved model's
            param.data = param.data.clone()
    smoothing = getattr(model, "smoothed_vision_tower", None)
    if smoothing is not None:
        if smoothing.config is getattr(getattr(model, "config", None), "feature_smoothing", None):
            smoothing.config.booster = str(booster)  # the model's one smoothing config names its booster
    return model


def save_booster_adapter(model: nn.Module, folder: str | os.PathLike, adapter_name: str) -> None:
    """Booster `adapter_name` of `model` (its layers injected in place, no `PeftModel`) as a PEFT adapter folder:
    `adapter_config.json` and `adapter_model.safetensors`, the files `PeftModel.save_pretrained` writes and
    [`load_booster`] / `PeftModel.from_pretrained` read."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    record_smoothing(model.peft_config[adapter_name], model)  # the smoothing as it is now, not as when attached
    model.peft_config[adapter_name].save_pretrained(str(folder))
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in state.items()}, str(folder / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})


def _config_from_dict(data: dict) -> GSBConfig:
    """A booster config from the dict a checkpoint recorded (`booster_config_dict`); unknown keys are dropped."""
    names = {f.name for f in dataclasses.fields(GSBConfig)}
    return GSBConfig(**{k: v for k, v in data.items() if k in names})


# what the smoothed models need from the booster (registered with `models.booster_support` by `booster/__init__`)
BOOSTER_SUPPORT = BoosterSupport(
    load=load_booster, inject=inject_booster, remove=remove_boosters, layers=booster_layers, names=booster_names,
    config_dict=booster_config_dict, config_from_dict=_config_from_dict, save_adapter=save_booster_adapter,
    smoothing_record=smoothing_record, applied_by_tower=smoothing_applied_by_tower, parameter_prefix=PARAMETER_PREFIX,
)


__all__ = ["BOOSTER_SUPPORT", "activate_booster", "booster_source", "check_booster_state_dict", "check_finite", "inject_booster",
           "load_booster", "record_smoothing", "remove_boosters", "restore_smoothing", "save_booster_adapter",
           "smoothing_applied_by_tower"]
