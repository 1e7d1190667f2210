"""Certification of smoothed encoders: the statistics (`bounds`, `betting`: pure torch, never transformers), the
sampling drivers (`certify`, `certify_prediction`), certificate records, input handling, feature centring
(`estimate_feature_mean`); the statistics they rest on live in `hf_feature_smoothing.statistics`."""

from .centering import estimate_feature_mean
from .certificates import NOISE_SPACE, FeatureCertificate, PredictionCertificate
from .certify import REFERENCES, as_smoothed_tower, certify, certify_prediction
from .inputs import INPUT_SPACES, to_image_inputs


__all__ = [
    "INPUT_SPACES",
    "NOISE_SPACE",
    "REFERENCES",
    "FeatureCertificate",
    "PredictionCertificate",
    "as_smoothed_tower",
    "certify",
    "certify_prediction",
    "estimate_feature_mean",
    "to_image_inputs",
]
