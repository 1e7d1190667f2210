"""L1 statistics: the certification math in the paper's names (Φ, FCSB, radii, Hoeffding / Bernstein / betting
confidence bounds, Cohen et al.'s vote certificate with an anytime-valid bound, dataset aggregates, advisories on
stored certificates). Torch and the standard library only:
nothing here imports transformers or peft (checked by `tests/test_layers.py`)."""

from .advisories import ADVISORIES, Advisory, advisories_for
from .aggregates import bootstrap_ci, certified_accuracy, certified_cosine
from .betting import BettingTest, betting_lower_bound, betting_rejects
from .bounds import (
    CONFIDENCE_BOUNDS,
    certified_radius,
    fcsb,
    lower_confidence_bound,
    normal_cdf,
    normal_ppf,
    prediction_radius,
    score_for_certificate,
    upper_confidence_bound,
)
from .vote import VoteBound, VoteResult, certify_vote, top_class, vote_radius, vote_target


__all__ = [
    "ADVISORIES",
    "CONFIDENCE_BOUNDS",
    "Advisory",
    "BettingTest",
    "VoteBound",
    "VoteResult",
    "advisories_for",
    "betting_lower_bound",
    "betting_rejects",
    "bootstrap_ci",
    "certified_accuracy",
    "certified_cosine",
    "certified_radius",
    "certify_vote",
    "fcsb",
    "lower_confidence_bound",
    "normal_cdf",
    "normal_ppf",
    "prediction_radius",
    "score_for_certificate",
    "top_class",
    "upper_confidence_bound",
    "vote_radius",
    "vote_target",
]
