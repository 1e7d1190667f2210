"""Certification of smoothed encoders (L2, on top of `smoothing/` and `statistics/`): the drivers `certify` and
`certify_prediction` (select on n0 samples, estimate on n others, bound, radius), their shared argument checks
(`arguments.py`) and sampling machinery (`sampling.py`), certificate records, input handling, feature centring
(`estimate_feature_mean`) and class prototypes."""

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
