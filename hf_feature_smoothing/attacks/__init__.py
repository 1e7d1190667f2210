"""White-box attacks: on the feature cosine of (smoothed) towers (`feature`), on the text an MLLM generates
(`text`), and side-by-side evaluation of plain / smoothed / boosted variants (`evaluation`)."""

from .feature import AttackResult, apgd_feature_attack, feature_attack, perturbation_norm, pgd_feature_attack
from .text import TextAttackResult, target_text_attack


__all__ = [
    "AttackResult",
    "TextAttackResult",
    "apgd_feature_attack",
    "feature_attack",
    "perturbation_norm",
    "pgd_feature_attack",
    "target_text_attack",
]
