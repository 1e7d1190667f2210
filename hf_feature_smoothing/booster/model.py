"""`FeatureBoosterModel`: the PEFT tuner that places Gaussian Smoothness Boosters (loading: `loading.py`)."""

from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import register_peft_method
from torch import nn

from ..configuration_feature_smoothing import FeatureSmoothingConfig
from ..logging_utils import get_logger
from ..towers import base_model_type, get_tower_adapter
from .configuration_booster import FeatureBoosterConfig
from .layer import FeatureBoosterLayer
from .loading import check_booster_state_dict, load_booster, record_smoothing, restore_smoothing
from .registration import PARAMETER_PREFIX, PEFT_METHOD_NAME


logger = get_logger(__name__)


class FeatureBoosterModel(BaseTuner):
    """Injects [`FeatureBoosterLayer`]s. Before any weight is loaded, the adapter's `tower_family` and
    `feature_dim` are checked against the model, so a booster built for another tower fails with a clear error."""

    prefix = PARAMETER_PREFIX
    tuner_layer_cls = FeatureBoosterLayer
    target_module_mapping: dict = {}

    def __init__(self, model, peft_config, adapter_name, *args, **kwargs):
        super().__init__(model, peft_config, adapter_name, *args, **kwargs)
        restore_smoothing(self.model, self.peft_config[adapter_name])  # a loaded booster acts only under smoothing

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        state_dict = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        check_booster_state_dict(model, adapter_name, state_dict, getattr(config, "_source", None))  # strict
        return state_dict

    def _prepare_adapter_config(self, peft_config: FeatureBoosterConfig, model_config: dict) -> FeatureBoosterConfig:
        adapter = get_tower_adapter(self.model, FeatureSmoothingConfig())
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
        if peft_config.target_modules is None:
            peft_config.target_modules = [adapter.booster_target()]
        if peft_config.position is None:
            peft_config.position = adapter.booster_position
        return peft_config

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, FeatureBoosterLayer):
            target.update_layer(adapter_name, peft_config)
            return
        new = FeatureBoosterLayer(target, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)
        self._replace_module(parent, target_name, new, target)

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        return key.replace(f".{PARAMETER_PREFIX}mapper.{adapter_name}.", f".{PARAMETER_PREFIX}mapper.")

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if merge:
            raise NotImplementedError("A booster cannot be merged into the base weights; use `unload()`.")
        for name, module in list(self.model.named_modules()):
            if isinstance(module, FeatureBoosterLayer):
                parent, _, child = name.rpartition(".")
                setattr(self.model.get_submodule(parent) if parent else self.model, child, module.base_layer)
        return self.model


register_peft_method(
    name=PEFT_METHOD_NAME, config_cls=FeatureBoosterConfig, model_cls=FeatureBoosterModel, prefix=PARAMETER_PREFIX
)


def add_booster(model: nn.Module, config: FeatureBoosterConfig | None = None, adapter_name: str = "default") -> PeftModel:
    """Wrap `model` in a `PeftModel` with a fresh (identity) booster; only the booster is trainable."""
    return get_peft_model(model, config or FeatureBoosterConfig(), adapter_name=adapter_name)


__all__ = ["FeatureBoosterModel", "add_booster", "load_booster"]
