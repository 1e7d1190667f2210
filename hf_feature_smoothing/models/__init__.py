from . import (
    auto,  # noqa: F401  (Auto `smoothing=` and the stock-model_type warning)
    tower_pretrained,  # noqa: F401  (registers SmoothedVisionTower.from_pretrained / save files)
)
from .answer_certificates import AnswerCertificate, certify_answer
from .answers import CandidateAnswers
from .llava import SmoothedLlavaConfig, SmoothedLlavaForConditionalGeneration
from .loading import load_smoothed
from .modeling_smoothed import make_smoothed
from .qwen_vl import (
    SmoothedQwen2_5_VLConfig,
    SmoothedQwen2_5_VLForConditionalGeneration,
    SmoothedQwen2VLConfig,
    SmoothedQwen2VLForConditionalGeneration,
    SmoothedQwen3VLConfig,
    SmoothedQwen3VLForConditionalGeneration,
)
from .registry import SMOOTHED_MODEL_CLASSES, register_smoothed_model, smoothed_class_for


__all__ = [
    "SMOOTHED_MODEL_CLASSES",
    "AnswerCertificate",
    "CandidateAnswers",
    "SmoothedLlavaConfig",
    "SmoothedLlavaForConditionalGeneration",
    "SmoothedQwen2VLConfig",
    "SmoothedQwen2VLForConditionalGeneration",
    "SmoothedQwen2_5_VLConfig",
    "SmoothedQwen2_5_VLForConditionalGeneration",
    "SmoothedQwen3VLConfig",
    "SmoothedQwen3VLForConditionalGeneration",
    "certify_answer",
    "load_smoothed",
    "make_smoothed",
    "register_smoothed_model",
    "smoothed_class_for",
]
