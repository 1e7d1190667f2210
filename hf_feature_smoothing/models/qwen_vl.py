"""`smoothed_qwen2_vl`, `smoothed_qwen2_5_vl`, `smoothed_qwen3_vl`: Qwen-VL models with smoothed vision features."""

from huggingface_hub.dataclasses import strict
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from ..smoothing.configuration_feature_smoothing import FeatureSmoothingConfig
from .configuration_smoothed import SmoothedConfigMixin
from .modeling_smoothed import FeatureSmoothingMixin
from .registry import register_smoothed_model


@strict
class SmoothedQwen2VLConfig(SmoothedConfigMixin, Qwen2VLConfig):
    model_type = "smoothed_qwen2_vl"
    feature_smoothing: FeatureSmoothingConfig | dict | None = None


class SmoothedQwen2VLForConditionalGeneration(FeatureSmoothingMixin, Qwen2VLForConditionalGeneration):
    config_class = SmoothedQwen2VLConfig

    def __init__(self, config: SmoothedQwen2VLConfig):
        super().__init__(config)
        self._init_feature_smoothing()


@strict
class SmoothedQwen2_5_VLConfig(SmoothedConfigMixin, Qwen2_5_VLConfig):
    model_type = "smoothed_qwen2_5_vl"
    feature_smoothing: FeatureSmoothingConfig | dict | None = None


class SmoothedQwen2_5_VLForConditionalGeneration(FeatureSmoothingMixin, Qwen2_5_VLForConditionalGeneration):
    config_class = SmoothedQwen2_5_VLConfig

    def __init__(self, config: SmoothedQwen2_5_VLConfig):
        super().__init__(config)
        self._init_feature_smoothing()


@strict
class SmoothedQwen3VLConfig(SmoothedConfigMixin, Qwen3VLConfig):
    model_type = "smoothed_qwen3_vl"
    feature_smoothing: FeatureSmoothingConfig | dict | None = None


class SmoothedQwen3VLForConditionalGeneration(FeatureSmoothingMixin, Qwen3VLForConditionalGeneration):
    config_class = SmoothedQwen3VLConfig

    def __init__(self, config: SmoothedQwen3VLConfig):
        super().__init__(config)
        self._init_feature_smoothing()


register_smoothed_model(SmoothedQwen2VLConfig, SmoothedQwen2VLForConditionalGeneration)
register_smoothed_model(SmoothedQwen2_5_VLConfig, SmoothedQwen2_5_VLForConditionalGeneration)
register_smoothed_model(SmoothedQwen3VLConfig, SmoothedQwen3VLForConditionalGeneration)
