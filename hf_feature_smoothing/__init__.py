"""Certified Feature-space Smoothing (FS) and the Gaussian Smoothness Booster (GSB) for 🤗 Transformers vision and
multimodal models. Importing the package registers the `smoothed_*` model types with the Auto classes, the booster
method with PEFT and with the smoothed models, and the Hub I/O of smoothed towers and models."""

from .booster import GSBConfig, GSBModel, GSBTrainer, add_booster, booster_noise_level
from .booster.loading import load_booster
from .certification import certify, certify_prediction
from .hub import push_certified_to_hub, save_certified
from .models import (
    SMOOTHED_MODEL_CLASSES,
    AnswerCertificate,
    CandidateAnswers,
    SmoothedLlavaConfig,
    SmoothedLlavaForConditionalGeneration,
    SmoothedQwen2_5_VLConfig,
    SmoothedQwen2_5_VLForConditionalGeneration,
    SmoothedQwen2VLConfig,
    SmoothedQwen2VLForConditionalGeneration,
    SmoothedQwen3VLConfig,
    SmoothedQwen3VLForConditionalGeneration,
    certify_answer,
)
from .smoothing.configuration_feature_smoothing import FeatureSmoothingConfig
from .smoothing.modeling_smoothed_tower import SmoothedVisionTower
from .smoothing.towers import TOWER_FAMILIES, ImageInputs, TowerFamily, get_tower_family, register_tower_family
from .utils.deprecation import deprecated_aliases
from .version import __version__


__all__ = [
    "SMOOTHED_MODEL_CLASSES",
    "TOWER_FAMILIES",
    "AnswerCertificate",
    "CandidateAnswers",
    "FeatureSmoothingConfig",
    "GSBConfig",
    "GSBModel",
    "GSBTrainer",
    "ImageInputs",
    "SmoothedLlavaConfig",
    "SmoothedLlavaForConditionalGeneration",
    "SmoothedQwen2VLConfig",
    "SmoothedQwen2VLForConditionalGeneration",
    "SmoothedQwen2_5_VLConfig",
    "SmoothedQwen2_5_VLForConditionalGeneration",
    "SmoothedQwen3VLConfig",
    "SmoothedQwen3VLForConditionalGeneration",
    "SmoothedVisionTower",
    "TowerFamily",
    "__version__",
    "add_booster",
    "booster_noise_level",
    "certify",
    "certify_answer",
    "certify_prediction",
    "get_tower_family",
    "load_booster",
    "push_certified_to_hub",
    "register_tower_family",
    "save_certified",
]

# names of 0.1.0 (the `FeatureBooster*` stem), kept as aliases that warn once
__getattr__ = deprecated_aliases(globals(), {"FeatureBoosterConfig": "GSBConfig", "FeatureBoosterModel": "GSBModel",
                                             "TowerAdapter": "TowerFamily", "TOWER_ADAPTERS": "TOWER_FAMILIES",
                                             "get_tower_adapter": "get_tower_family",
                                             "register_tower_adapter": "register_tower_family"})
