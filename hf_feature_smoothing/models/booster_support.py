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


__all__ = ["BoosterSupport", "booster_support", "register_booster_support"]
