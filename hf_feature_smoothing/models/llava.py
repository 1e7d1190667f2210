"""`smoothed_llava`: LLaVA whose language model receives Feature-space-Smoothed vision features."""

from huggingface_hub.dataclasses import strict
from transformers import LlavaConfig, LlavaForConditionalGeneration

from ..smoothing.configuration_feature_smoothing import FeatureSmoothingConfig
from .configuration_smoothed import SmoothedConfigMixin
from .modeling_smoothed import FeatureSmoothingMixin
from .registry import register_smoothed_model


@strict
class SmoothedLlavaConfig(SmoothedConfigMixin, LlavaConfig):
    model_type = "smoothed_llava"
    feature_smoothing: FeatureSmoothingConfig | dict | None = None


class SmoothedLlavaForConditionalGeneration(FeatureSmoothingMixin, LlavaForConditionalGeneration):
    config_class = SmoothedLlavaConfig

    def __init__(self, config: SmoothedLlavaConfig):
        super().__init__(config)
        self._init_feature_smoothing()


register_smoothed_model(SmoothedLlavaConfig, SmoothedLlavaForConditionalGeneration)
