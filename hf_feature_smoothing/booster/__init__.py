"""Gaussian Smoothness Booster (GSB): a PEFT method (`peft_type="FEATURE_BOOSTER"`) that raises the Gaussian
robustness score of a frozen vision tower. Importing this package registers the method with PEFT."""

from ..models.booster_support import register_booster_support
from .configuration_booster import FeatureBoosterConfig
from .layer import (
    BoosterTunerLayer,
    FeatureBoosterLayer,
    PixelPurifierLayer,
    booster_layers,
    booster_noise_level,
    restore_booster_condition,
    set_booster_condition,
)
from .loading import BOOSTER_SUPPORT, inject_booster, remove_boosters
from .mapper import GSBMapper
from .model import FeatureBoosterModel, add_booster, load_booster
from .purifier import PixelPurifier
from .trainer import GSBImageCollator, GSBLoss, GSBTrainer


register_booster_support(BOOSTER_SUPPORT)


__all__ = [
    "BoosterTunerLayer",
    "FeatureBoosterConfig",
    "FeatureBoosterLayer",
    "FeatureBoosterModel",
    "GSBImageCollator",
    "GSBLoss",
    "GSBMapper",
    "GSBTrainer",
    "PixelPurifier",
    "PixelPurifierLayer",
    "add_booster",
    "booster_layers",
    "booster_noise_level",
    "inject_booster",
    "load_booster",
    "remove_boosters",
    "restore_booster_condition",
    "set_booster_condition",
]
