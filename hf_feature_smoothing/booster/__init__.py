"""Gaussian Smoothness Booster (GSB): a PEFT method (`peft_type="FEATURE_BOOSTER"`) that raises the Gaussian
robustness score of a frozen vision tower. Importing this package registers the method with PEFT."""

from .configuration_booster import FeatureBoosterConfig
from .layer import FeatureBoosterLayer, GSBMapper, booster_layers, booster_noise_level
from .model import FeatureBoosterModel, add_booster, load_booster
from .trainer import GSBImageCollator, GSBLoss, GSBTrainer


__all__ = [
    "FeatureBoosterConfig",
    "FeatureBoosterLayer",
    "FeatureBoosterModel",
    "GSBImageCollator",
    "GSBLoss",
    "GSBMapper",
    "GSBTrainer",
    "add_booster",
    "booster_layers",
    "booster_noise_level",
    "load_booster",
]
