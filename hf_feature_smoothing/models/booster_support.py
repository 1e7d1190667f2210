"""What the smoothed models need from the booster method, registered by `hf_feature_smoothing.booster` when it is
imported, the way a PEFT method fills PEFT's registries through `register_peft_method`: the models layer never
imports the booster (which sits above it and builds on it). Importing `hf_feature_smoothing` registers it."""

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class BoosterSupport:
    """
    The booster operations a smoothed model or tower performs on load and save.

    Args:
        load (`Callable`): `load(model, source, adapter_name=..., **hub_kwargs)`, strict (see `booster.load_booster`).
        inject (`Callable`): `inject(model, config, adapter_name)`, fresh layers for a config.
        remove (`Callable`): `remove(model)`, every booster layer and hook unwrapped.
        layers (`Callable`): `layers(model)`, the booster tuner layers.
        names (`Callable`): `names(model)`, the names of the boosters held.
        config_dict (`Callable`): a booster config as the JSON dict of its `adapter_config.json`.
        config_from_dict (`Callable`): the inverse (the booster config class).
        save_adapter (`Callable`): `save_adapter(model, folder, adapter_name)`, the PEFT adapter files.
        smoothing_record (`Callable`): the smoothing fields a booster records.
        applied_by_tower (`Callable`): context manager: boosters loaded inside are conditioned by a tower.
        parameter_prefix (`str`): the prefix of every booster parameter name.
    """

    load: Callable
    inject: Callable
    remove: Callable
    layers: Callable
    names: Callable
    config_dict: Callable
    config_from_dict: Callable
    save_adapter: Callable
    smoothing_record: Callable
    applied_by_tower: Callable
    parameter_prefix: str


_SUPPORT: list[BoosterSupport] = []


def register_booster_support(support: BoosterSupport) -> None:
    """Register the booster method's operations (called by `hf_feature_smoothing.booster` on import)."""
    _SUPPORT[:] = [support]


def booster_support() -> BoosterSupport:
    """The registered booster operations."""
    if not _SUPPORT:
        raise RuntimeError("No booster method is registered: `import hf_feature_smoothing` (which imports and "
                           "registers `hf_feature_smoothing.booster`) before loading or saving smoothed models.")
    return _SUPPORT[0]


def booster_to_save(model, booster: str | None) -> str | None:
    """The name of the booster `model` runs, which `save_pretrained` saves with it (None: it holds none). Refuses
    what would make the saved model differ from the one that runs: several boosters, a disabled one, or a
    `booster` (the smoothing config's field) naming one the model does not hold."""
    support = booster_support()
    names = support.names(model)  # mapper and purifier: a purifier-only booster is a booster too
    if len(names) > 1:
        raise ValueError(f"The model holds several boosters {names}; keep one before `save_pretrained` "
                         "(`remove_boosters(model)`, then `load_booster` the one to keep).")
    if not names:
        if booster is not None:
            raise ValueError(f"`smoothing_config.booster` is {booster!r} but the model holds no booster: the saved "
                             f"model would claim one it does not run. Load it (`load_booster(model, {booster!r})`) "
                             "or clear the field (`smoothing_config.booster = None`).")
        return None
    if any(layer.disable_adapters or names[0] not in layer.active_adapters for layer in support.layers(model)):
        raise ValueError(f"Booster `{names[0]}` is disabled: the saved model would differ from the one you run. "
                         "Enable it (`layer.enable_adapters(True)` for each of `booster_layers(model)`) or remove "
                         "it (`remove_boosters(model)`) before `save_pretrained`.")
    return names[0]


__all__ = ["BoosterSupport", "booster_support", "booster_to_save", "register_booster_support"]
