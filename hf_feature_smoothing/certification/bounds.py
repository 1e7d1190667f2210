"""The certification math of Feature-space Smoothing, in the paper's names. Pure: stdlib and torch only (never
transformers), no I/O.

Notation: σ noise std in [0, 1] pixel space, ε an ℓ2 perturbation budget in the same units, S the Gaussian
robustness score E[(1 + cos(f(x + δ), v)) / 2] against a reference unit vector v fixed before the noise is drawn
(the paper's v = f(x)), α the failure probability of a one-sided lower confidence bound.
"""

import math
from statistics import NormalDist

import torch


_STANDARD_NORMAL = NormalDist()
CONFIDENCE_BOUNDS = ("bernstein", "hoeffding")


def normal_cdf(x: float) -> float:
    """Φ(x), the standard normal CDF (Φ(±inf) = 1 or 0)."""
    return _STANDARD_NORMAL.cdf(x) if math.isfinite(x) else float(x > 0)


def normal_ppf(p: float) -> float:
    """Φ⁻¹(p), the standard normal quantile; Φ⁻¹(0) = -inf, Φ⁻¹(1) = inf, and p ∉ [0, 1] raises."""
    if not 0.0 <= p <= 1.0 or math.isnan(p):
        raise ValueError(f"`p` must be a probability in [0, 1], got {p!r}.")
    if p == 0.0:
        return -math.inf
    if p == 1.0:
        return math.inf
    return _STANDARD_NORMAL.inv_cdf(p)


def fcsb(score: float, epsilon: float, sigma: float) -> float:
    """
    Feature Cosine Similarity Bound: FCSB(ε) = 2Φ(Φ⁻¹(S) − ε/σ) − 1.

    For every x' with ‖x' − x‖₂ ≤ ε, ⟨f̂(x'), v⟩ ≥ FCSB(ε); when FCSB(ε) ≥ 0 (and f̂(x') ≠ 0) also
    cos(f̂(x'), v) ≥ FCSB(ε). A negative value bounds the inner product only, never the cosine.
    """
    if epsilon < 0 or sigma <= 0:
        raise ValueError(f"Need `epsilon` ≥ 0 and `sigma` > 0, got epsilon={epsilon!r}, sigma={sigma!r}.")
    return 2.0 * normal_cdf(normal_ppf(score) - epsilon / sigma) - 1.0


def certified_radius(score: float, sigma: float, tau: float = 0.0) -> float:
    """R_τ = σ[Φ⁻¹(S) − Φ⁻¹((1 + τ)/2)]: the largest ε with FCSB(ε) ≥ τ (0 ≤ τ < 1). 0 means no certificate."""
    if not 0.0 <= tau < 1.0:
        raise ValueError(f"`tau` must be a cosine threshold in [0, 1), got {tau!r}.")
    return max(0.0, sigma * (normal_ppf(score) - normal_ppf((1.0 + tau) / 2.0)))


def hoeffding_lower_bound(scores: torch.Tensor, alpha: float) -> float:
    """One-sided Hoeffding bound for i.i.d. scores in [0, 1]: P(E[s] ≥ mean − √(ln(1/α) / 2n)) ≥ 1 − α."""
    n = scores.numel()
    return scores.double().mean().item() - math.sqrt(math.log(1.0 / alpha) / (2.0 * n))


def empirical_bernstein_lower_bound(scores: torch.Tensor, alpha: float) -> float:
    """Maurer & Pontil (2009, Thm 4) for i.i.d. scores in [0, 1]: with probability ≥ 1 − α,
    E[s] ≥ mean − √(2 V ln(2/α) / n) − 7 ln(2/α) / (3(n − 1)), V the unbiased sample variance. Much tighter than
    Hoeffding when the scores concentrate (a robust encoder), slightly looser for tiny n."""
    n = scores.numel()
    if n < 2:
        return -math.inf
    s = scores.double()
    log_term = math.log(2.0 / alpha)
    return s.mean().item() - math.sqrt(2.0 * s.var(unbiased=True).item() * log_term / n) - 7.0 * log_term / (
        3.0 * (n - 1)
    )


def lower_confidence_bound(scores: torch.Tensor, alpha: float, method: str = "bernstein") -> float:
    """(1 − α) one-sided lower confidence bound on the mean of i.i.d. [0, 1] scores, clipped to [0, 1]."""
    if method not in CONFIDENCE_BOUNDS:
        raise ValueError(f"`method` must be one of {CONFIDENCE_BOUNDS}, got {method!r}.")
    if scores.numel() == 0:
        raise ValueError("`scores` is empty: a confidence bound needs at least one sample.")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise ValueError(f"`alpha` must be in (0, 1), got {alpha!r}; e.g. `alpha=0.001` for 99.9% confidence.")
    bound = hoeffding_lower_bound if method == "hoeffding" else empirical_bernstein_lower_bound
    return min(1.0, max(0.0, bound(scores, alpha)))


def upper_confidence_bound(scores: torch.Tensor, alpha: float, method: str = "bernstein") -> float:
    """(1 − α) one-sided upper confidence bound on the mean of i.i.d. [0, 1] scores."""
    return 1.0 - lower_confidence_bound(1.0 - scores, alpha, method)


def prediction_radius(p_lower: float, p_upper_others: list[float], sigma: float) -> float:
    """
    Certified radius of a cosine-similarity predictor y(x) = argmax_k cos(f̂(x), t_k) over unit prototypes t_k:
    R = (σ/2)[Φ⁻¹(p̲_y) − max_{k≠y} Φ⁻¹(p̄_k)], with p_k = (1 + ⟨f̂(x), t_k⟩)/2 (each p_k is the Gaussian smoothing
    of a [0, 1] function, so Φ⁻¹(p_k) is σ⁻¹-Lipschitz). 0 means no certificate (abstain).
    """
    top_other = max((normal_ppf(p) for p in p_upper_others), default=-math.inf)
    return max(0.0, 0.5 * sigma * (normal_ppf(p_lower) - top_other))
