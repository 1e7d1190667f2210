"""`GSBModel`: the PEFT tuner that places Gaussian Smoothness Boosters (loading: `loading.py`)."""

from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import register_peft_method
from torch import nn

from ..smoothing.configuration_feature_smoothing import FeatureSmoothingConfig
from ..smoothing.towers import TOWER_FAMILIES, BoosterGeometry, base_model_type, get_tower_family
from ..utils.deprecation import deprecated_aliases
from ..utils.logging import get_logger
from .configuration_booster import GSBConfig
from .layer import GSBLayer, GSBMapperLayer, GSBPurifierLayer, booster_layers, unwrap_boosters
from .loading import check_booster_state_dict, load_booster, record_smoothing, restore_smoothing
from .registration import DEFAULT_ADAPTER_NAME, PARAMETER_PREFIX, PEFT_METHOD_NAME


logger = get_logger(__name__)


def _matches(key: str, target: str | None) -> bool:
    return target is not None and (key == target or key.endswith("." + target))


def _find_module(model: nn.Module, target: str) -> nn.Module:
    """The outermost module whose name is `target` or ends with `.target`."""
    module = next((m for name, m in model.named_modules() if _matches(name, target)), None)
    if module is None:
        raise ValueError(f"No module `{target}` in {type(model).__name__}.")
    return module


class GSBModel(BaseTuner):
    """Injects the booster's tuner layers: a [`GSBMapperLayer`] (mapper) on the feature site and a
    [`GSBPurifierLayer`] on the module that first consumes the pixels. Before any weight is loaded, the adapter's
    `tower_family`, `feature_dim` and `purifier_module` are checked against the model, so a booster built for another
    tower fails with a clear error."""

    prefix = PARAMETER_PREFIX
    tuner_layer_cls = GSBLayer
    target_module_mapping: dict = {}

    def __init__(self, model, peft_config, adapter_name, *args, **kwargs):
        super().__init__(model, peft_config, adapter_name, *args, **kwargs)
        restore_smoothing(self.model, self.peft_config[adapter_name])  # a loaded booster acts only under smoothing

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        state_dict = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        check_booster_state_dict(model, adapter_name, state_dict, getattr(config, "_source", None))  # strict
        return state_dict

    def _tower(self):
        """The tower adapter, for the structure only (sites, widths, geometry): the model's own smoothing config where
        it has one, else the family's default statistics given explicitly (they play no part here, so no warning)."""
        own = getattr(getattr(self.model, "smoothed_vision_tower", None), "config", None)
        if own is None:
            family = TOWER_FAMILIES.get(base_model_type(self.model))
            mean, std = family.family_default_stats(base_model_type(self.model)) if family else (None, None)
            own = FeatureSmoothingConfig(image_mean=mean, image_std=std)
        return get_tower_family(self.model, own)

    def _geometry(self) -> BoosterGeometry:
        return self._tower().booster_geometry()

    def _prepare_adapter_config(self, peft_config: GSBConfig, model_config: dict) -> GSBConfig:
        adapter = self._tower()
        family = base_model_type(self.model)
        if peft_config.tower_family not in (None, family):
            raise ValueError(
                f"This booster was built for `{peft_config.tower_family}` towers but the model is a `{family}`; load a "
                f"booster trained for `{family}` (adapter_config.json `tower_family`)."
            )
        expected = adapter.booster_feature_dim()
        if peft_config.feature_dim not in (0, expected):
            raise ValueError(
                f"Booster `feature_dim`={peft_config.feature_dim} does not match this `{family}` tower's feature width "
                f"{expected}; the adapter was trained on a different model size. Load a booster trained for this model."
            )
        peft_config.tower_family, peft_config.feature_dim = family, expected
        if peft_config.smoothing is None:
            record_smoothing(peft_config, self.model)
        geometry = adapter.booster_geometry() if peft_config.purifier or peft_config.mapper_mixing else None
        if peft_config.purifier:
            if peft_config.purifier_module not in (None, geometry.pixel_entry):
                raise ValueError(
                    f"This booster's purifier wraps `{peft_config.purifier_module}` but this `{family}` model's pixels "
                    f"enter at `{geometry.pixel_entry}` (adapter_config.json `purifier_module`); load a booster trained "
                    "for this tower."
                )
            peft_config.purifier_module = geometry.pixel_entry
        if peft_config.target_modules is None:
            site = adapter.booster_target()
            if peft_config.mapper_mixing and geometry.token_target is not None:
                site = geometry.token_target  # the default site is pooled: mix the tokens before pooling
            targets = [site] if peft_config.mapper else []
            peft_config.target_modules = targets + ([peft_config.purifier_module] if peft_config.purifier else [])
        elif peft_config.purifier:
            targets = [peft_config.target_modules] if isinstance(peft_config.target_modules, str) else list(
                peft_config.target_modules)
            if peft_config.purifier_module not in targets:
                peft_config.target_modules = targets + [peft_config.purifier_module]
        if peft_config.position is None:
            peft_config.position = adapter.booster_position
        return peft_config

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        purifier = bool(peft_config.purifier) and _matches(current_key, peft_config.purifier_module)
        if not purifier and not peft_config.mapper:
            raise ValueError(f"`target_modules` matched `{current_key}`, but this booster has no mapper (`mapper=False`); "
                             "leave `target_modules=None`.")
        layer_cls = GSBPurifierLayer if purifier else GSBMapperLayer
        needs_geometry = purifier or peft_config.mapper_mixing is not None
        if isinstance(target, layer_cls):
            if needs_geometry and target.geometry is None:
                target.geometry = self._geometry()
            target.update_layer(adapter_name, peft_config)
        elif isinstance(target, GSBLayer):
            raise ValueError(f"`{current_key}` already holds a booster {type(target).__name__}; the mapper and the "
                             "purifier need different modules.")
        else:
            layer = layer_cls(target, adapter_name, peft_config, geometry=self._geometry() if needs_geometry else None)
            if adapter_name not in self.active_adapters:
                layer.requires_grad_(False)
            self._replace_module(parent, target_name, layer, target)
            target = layer
        if target.probe is not None:
            target.probe.attach(_find_module(self.model, target.geometry.grid_source))

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        super().inject_adapter(model, adapter_name, **kwargs)
        config = self.peft_config[adapter_name]
        placed = {type(layer) for layer in booster_layers(model)
                  if any(adapter_name in getattr(layer, n) for n in layer.adapter_layer_names)}
        for wanted, cls, where in ((config.purifier, GSBPurifierLayer, config.purifier_module),
                                   (config.mapper, GSBMapperLayer, config.target_modules)):
            if wanted and cls not in placed:
                raise ValueError(f"The booster's {cls.__name__} was not placed: no module matched `{where}`.")

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        for part in ("mapper", "purifier"):
            key = key.replace(f".{PARAMETER_PREFIX}{part}.{adapter_name}.", f".{PARAMETER_PREFIX}{part}.")
        return key

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if merge:
            raise NotImplementedError("A booster cannot be merged into the base weights; use `unload()`.")
        return unwrap_boosters(self.model)


register_peft_method(
    name=PEFT_METHOD_NAME, config_cls=GSBConfig, model_cls=GSBModel, prefix=PARAMETER_PREFIX
)


def add_booster(model: nn.Module, config: GSBConfig | None = None, adapter_name: str = DEFAULT_ADAPTER_NAME) -> PeftModel:
    """Wrap `model` in a `PeftModel` with a fresh (identity) booster; only the booster is trainable."""
    return get_peft_model(model, config or GSBConfig(), adapter_name=adapter_name)


__all__ = ["GSBModel", "add_booster", "load_booster"]

# names of 0.1.0 (the `FeatureBooster*` stem), kept as aliases that warn once
__getattr__ = deprecated_aliases(globals(), {"FeatureBoosterModel": "GSBModel"})
