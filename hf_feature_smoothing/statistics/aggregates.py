"""Aggregate certificates over a dataset: certified cosine at ε and certified accuracy at radius r (pure Python)."""

import math
import numbers
import random
from collections.abc import Sequence

from .bounds import fcsb, normal_ppf


ABSTAIN = None  # the one encoding of "no certified prediction" (`PredictionCertificate.prediction`)
REPORT_RADII = (0.0, 0.05, 0.1, 0.25, 0.5, 1.0)  # ℓ2 radii (pixel [0, 1] units) certified accuracy is reported at by default


def certified_cosine(score_lower: Sequence[float], sigma: Sequence[float], epsilons: Sequence[float]) -> dict:
    """Mean over images of FCSB(ε) from each image's S_low and σ; an abstention (S_low ≤ 1/2) or a negative bound
    counts as 0 (no guarantee). Also `abstain_rate`."""
    if not score_lower or len(score_lower) != len(sigma):
        raise ValueError(f"Need one `sigma` per `score_lower` and at least one image, got {len(score_lower)} and "
                         f"{len(sigma)}.")
    for s, sg in zip(score_lower, sigma):
        if not 0.0 <= s <= 1.0 or not sg > 0:
            raise ValueError(f"Need score_lower in [0, 1] and sigma > 0, got score_lower={s}, sigma={sg}.")
    result = {}
    for eps in epsilons:
        if not eps >= 0:
            raise ValueError(f"`epsilons` must be ≥ 0, got {eps}.")
        values = [max(fcsb(s, eps, sg), 0.0) if s > 0.5 else 0.0 for s, sg in zip(score_lower, sigma)]
        result[f"certified_cosine@{eps:g}"] = sum(values) / len(values)
    result["abstain_rate"] = sum(s <= 0.5 for s in score_lower) / len(score_lower)
    return result


def certified_accuracy(prediction: Sequence[int | None], label: Sequence[int], radius: Sequence[float],
                       radii: Sequence[float]) -> dict:
    """Fraction of images predicted correctly with certified radius ≥ r (Cohen et al.'s convention; r = 0: correct and
    not abstained, a certified prediction has radius > 0;
    `prediction` [`ABSTAIN`] (None, as in `PredictionCertificate`) means abstain). Also `abstain_rate`."""
    if not prediction or not len(prediction) == len(label) == len(radius):
        raise ValueError(f"Need equally many predictions, labels and radii (≥ 1), got {len(prediction)}, {len(label)}, "
                         f"{len(radius)}.")
    for p in prediction:
        if p is not ABSTAIN and (isinstance(p, bool) or not isinstance(p, numbers.Integral) or p < 0):
            raise ValueError(f"A prediction is a class index ≥ 0 or `None` (abstain), got {p!r}. (The `evaluate` "
                             "metric takes −1 for an abstention and converts it.)")
    result = {}
    for r in radii:
        if not r >= 0:
            raise ValueError(f"`radii` must be ≥ 0, got {r}.")
        hits = [p is not ABSTAIN and p == y and rad >= r for p, y, rad in zip(prediction, label, radius)]
        result[f"certified_accuracy@{r:g}"] = sum(hits) / len(hits)
    result["abstain_rate"] = sum(p is ABSTAIN for p in prediction) / len(prediction)
    return result


def bootstrap_ci(values: Sequence[float], resamples: int = 10000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of per-image `values` (images resampled with replacement;
    seeded, so a table is reproducible)."""
    if not values:
        raise ValueError("Need at least one value for a bootstrap interval.")
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(values, k=len(values))) / len(values) for _ in range(resamples))
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def wilson_interval(successes: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided Wilson score interval of a proportion `successes / total` (e.g. attack success over images)."""
    if total <= 0 or not 0 <= successes <= total:
        raise ValueError(f"need 0 ≤ successes ≤ total and total > 0, got {successes} of {total}.")
    z = normal_ppf(0.5 + confidence / 2)
    p, z2 = successes / total, z * z
    centre, half = p + z2 / (2 * total), z * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total))
    return max(0.0, (centre - half) / (1 + z2 / total)), min(1.0, (centre + half) / (1 + z2 / total))
