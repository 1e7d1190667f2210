"""Certification of smoothed encoders: the statistics (`bounds`, pure torch, never transformers), the sampling
drivers (`certify`, `certify_prediction`) and dataset aggregates (`summary`)."""

from .certify import (
    NOISE_SPACE,
    REFERENCES,
    FeatureCertificate,
    PredictionCertificate,
    as_smoothed_tower,
    certify,
    certify_prediction,
)


__all__ = [
    "NOISE_SPACE",
    "REFERENCES",
    "FeatureCertificate",
    "PredictionCertificate",
    "as_smoothed_tower",
    "certify",
    "certify_prediction",
]
