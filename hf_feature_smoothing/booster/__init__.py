"""Gaussian Smoothness Booster (GSB): a PEFT method (`peft_type="FEATURE_BOOSTER"`) that raises the Gaussian
robustness score of a frozen vision tower. Importing this package registers the method with PEFT."""

from ..models.booster_support import register_booster_support
from ..utils.deprecation import deprecated_aliases
from .configuration_booster import GSBConfig
from .layer import (
    GSBLayer,
    GSBMapperLayer,
    GSBPurifierLayer,
    booster_layers,
    booster_noise_level,
    restore_booster_condition,
    set_booster_condition,
)
from .loading import BOOSTER_SUPPORT, inject_booster, remove_boosters
from .mapper import GSBMapper
from .model import GSBModel, add_booster, load_booster
from .purifier import GSBPurifier
from .trainer import GSBImageCollator, GSBLoss, GSBTrainer


register_booster_support(BOOSTER_SUPPORT)


__all__ = [
    "GSBConfig",
    "GSBImageCollator",
    "GSBLayer",
    "GSBLoss",
    "GSBMapper",
    "GSBMapperLayer",
    "GSBModel",
    "GSBPurifier",
    "GSBPurifierLayer",
    "GSBTrainer",
    "add_booster",
    "booster_layers",
    "booster_noise_level",
    "inject_booster",
    "load_booster",
    "remove_boosters",
    "restore_booster_condition",
    "set_booster_condition",
]

# names of 0.1.0 (the `FeatureBooster*` stem), kept as aliases that warn once
__getattr__ = deprecated_aliases(globals(), {"FeatureBoosterConfig": "GSBConfig", "FeatureBoosterModel": "GSBModel",
                                             "FeatureBoosterLayer": "GSBMapperLayer",
                                             "PixelPurifierLayer": "GSBPurifierLayer",
                                             "BoosterTunerLayer": "GSBLayer", "PixelPurifier": "GSBPurifier"})
