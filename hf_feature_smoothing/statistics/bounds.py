"""The certification math of Feature-space Smoothing, in the paper's names. Pure: stdlib and torch only (never
transformers), no I/O.

Notation: σ noise std in [0, 1] pixel space, ε an ℓ2 perturbation budget in the same units, S the Gaussian
robustness score E[(1 + cos(f(x + δ), v)) / 2] against a reference unit vector v fixed before the noise is drawn
(the paper's v = f(x)), α the failure probability of a one-sided lower confidence bound.
"""

import math
from statistics import NormalDist

import torch

from .betting import betting_lower_bound


_STANDARD_NORMAL = NormalDist()
CONFIDENCE_BOUNDS = ("betting", "bernstein", "hoeffding")


_SHARED_SEARCH = 4096  # scores of several sequences searched together by `class_confidence_bounds`


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


def score_for_certificate(cosine: float, epsilon: float, sigma: float) -> float:
    """The smallest S with FCSB(ε) ≥ `cosine` (equivalently R_τ ≥ ε for τ = `cosine`): S = Φ(Φ⁻¹((1 + τ)/2) + ε/σ).
    FCSB and R_τ increase with S, so a lower bound S_low ≥ this value certifies the target."""
    if not 0.0 <= cosine < 1.0 or not epsilon >= 0 or not sigma > 0:
        raise ValueError(f"Need 0 ≤ `cosine` < 1, `epsilon` ≥ 0 and `sigma` > 0, got cosine={cosine!r}, "
                         f"epsilon={epsilon!r}, sigma={sigma!r}.")
    return normal_cdf(normal_ppf((1.0 + cosine) / 2.0) + epsilon / sigma)


def hoeffding_margin(n: int, alpha: float) -> float:
    """√(ln(1/α) / 2n): the one-sided Hoeffding margin for n scores in [0, 1]."""
    return math.sqrt(math.log(1.0 / alpha) / (2.0 * n))


def bernstein_margin(variance: float, n: int, alpha: float) -> float:
    """Maurer & Pontil (2009, Thm 4) margin √(2 V ln(2/α) / n) + 7 ln(2/α) / (3(n − 1)), V the unbiased sample
    variance (inf for n < 2)."""
    if n < 2:
        return math.inf
    log_term = math.log(2.0 / alpha)
    return math.sqrt(2.0 * max(variance, 0.0) * log_term / n) + 7.0 * log_term / (3.0 * (n - 1))


def hoeffding_lower_bound(scores: torch.Tensor, alpha: float) -> float:
    """One-sided Hoeffding bound for i.i.d. scores in [0, 1]: P(E[s] ≥ mean − √(ln(1/α) / 2n)) ≥ 1 − α.
    Distribution-free; valid at the fixed n only."""
    return scores.double().mean().item() - hoeffding_margin(scores.numel(), alpha)


def empirical_bernstein_lower_bound(scores: torch.Tensor, alpha: float) -> float:
    """Maurer & Pontil (2009, Thm 4) for i.i.d. scores in [0, 1]: with probability ≥ 1 − α,
    E[s] ≥ mean − √(2 V ln(2/α) / n) − 7 ln(2/α) / (3(n − 1)), V the unbiased sample variance; valid at the fixed n
    only. Tighter than Hoeffding only when V is small (a robust encoder) *and* n is large enough for the 7/(3(n − 1))
    term to fade; for high-variance scores, V ≥ ln(1/α) / (4 ln(2/α)) (≈ 0.23 at α = 10⁻³, e.g. Bernoulli(1/2)),
    Hoeffding is tighter at every n. The betting bound is tighter than both on concentrated scores."""
    n = scores.numel()
    if n < 2:
        return -math.inf
    s = scores.double()
    return s.mean().item() - bernstein_margin(s.var(unbiased=True).item(), n, alpha)


def lower_confidence_bound(scores: torch.Tensor, alpha: float, method: str = "betting",
                           horizon: int | None = None) -> float:
    """
    (1 − α) one-sided lower confidence bound on the mean of i.i.d. [0, 1] scores, clipped to [0, 1].

    `method`: `"betting"` (default; Waudby-Smith & Ramdas, within ≈ 1.15× of the S·ln(1/α)/n floor on concentrated
    scores, and a confidence sequence: valid at every prefix, so sequential stopping is allowed when `horizon`, which
    tunes its bets, is the planned maximum n fixed before sampling, see [`betting_lower_bound`]), `"bernstein"` (Maurer–Pontil) or `"hoeffding"` (both fixed-n only).
    """
    if method not in CONFIDENCE_BOUNDS:
        raise ValueError(f"`method` must be one of {CONFIDENCE_BOUNDS}, got {method!r}.")
    if scores.numel() == 0:
        raise ValueError("`scores` is empty: a confidence bound needs at least one sample.")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise ValueError(f"`alpha` must be in (0, 1), got {alpha!r}; e.g. `alpha=0.001` for 99.9% confidence.")
    if method == "betting":
        return betting_lower_bound(scores.flatten(), alpha, horizon).item()
    bound = hoeffding_lower_bound if method == "hoeffding" else empirical_bernstein_lower_bound
    return min(1.0, max(0.0, bound(scores.flatten(), alpha)))


def upper_confidence_bound(scores: torch.Tensor, alpha: float, method: str = "betting",
                           horizon: int | None = None) -> float:
    """(1 − α) one-sided upper confidence bound on the mean of i.i.d. [0, 1] scores: 1 − LCB(1 − scores)."""
    return 1.0 - lower_confidence_bound(1.0 - scores, alpha, method, horizon)


def class_confidence_bounds(scores: torch.Tensor, alphas: list[float], method: str = "betting",
                            horizon: int | None = None) -> tuple[float, list[float]]:
    """
    A lower bound on the mean of column 0 of `scores` `(n, K)` and an upper bound on the mean of every other column,
    column k at level `alphas[k]`: the bounds of a prediction certificate (the predicted class, its competitors).
    The values of [`lower_confidence_bound`] / [`upper_confidence_bound`] column by column, up to float rounding
    (short columns share one betting search, whose cost is mostly per step, not per score, up to `_SHARED_SEARCH`
    scores in all, so the memory stays that of one column's search; a shared search may take the other of two
    equivalent code paths). Each bound depends only on its own column and level.
    """
    if scores.ndim != 2 or scores.shape[0] == 0 or len(alphas) != scores.shape[1]:
        raise ValueError(f"`scores` must be (n ≥ 1, K) with one level per column, got shape {tuple(scores.shape)} "
                         f"and {len(alphas)} levels.")
    if any(isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 < a < 1 for a in alphas):
        raise ValueError(f"`alphas` must be levels in (0, 1), got {list(alphas)}.")
    if method != "betting":
        return (lower_confidence_bound(scores[:, 0], alphas[0], method),
                [upper_confidence_bound(scores[:, k], alphas[k], method) for k in range(1, scores.shape[1])])
    rows = torch.cat([scores[:, :1], 1.0 - scores[:, 1:]], dim=1).T  # lower bounds of p_0 and of 1 − p_k
    levels = torch.tensor(alphas, dtype=torch.float64)
    step = max(1, _SHARED_SEARCH // rows.shape[1])
    lows = torch.cat([betting_lower_bound(rows[i : i + step], levels[i : i + step], horizon)
                      for i in range(0, rows.shape[0], step)]).tolist()
    return lows[0], [1.0 - low for low in lows[1:]]


def moment_upper_bound(mean: float, variance: float, n: int, alpha: float, method: str) -> float:
    """(1 − α) upper bound from streaming moments only (mean and unbiased variance of n scores in [0, 1]):
    Hoeffding for `method="hoeffding"`, else the smaller of Maurer–Pontil and Hoeffding, each at α/2."""
    if method == "hoeffding":
        margin = hoeffding_margin(n, alpha)
    else:
        margin = min(bernstein_margin(variance, n, alpha / 2), hoeffding_margin(n, alpha / 2))
    return min(1.0, max(0.0, mean + margin))


def prediction_radius(p_lower: float, p_upper_others: list[float], sigma: float) -> float:
    """
    Certified radius of a cosine-similarity predictor y(x) = argmax_k cos(f̂(x), t_k) over unit prototypes t_k:
    R = (σ/2)[Φ⁻¹(p̲_y) − max_{k≠y} Φ⁻¹(p̄_k)], with p_k = (1 + ⟨f̂(x), t_k⟩)/2 (each p_k is the Gaussian smoothing
    of a [0, 1] function, so Φ⁻¹(p_k) is σ⁻¹-Lipschitz). 0 means no certificate (abstain).
    """
    values = [p_lower, *p_upper_others, sigma]
    if not all(math.isfinite(v) for v in values):  # `max` would drop a NaN that is not first
        raise ValueError(f"prediction_radius needs finite bounds and σ, got p_lower={p_lower}, "
                         f"p_upper_others={p_upper_others}, sigma={sigma}.")
    top_other = max((normal_ppf(p) for p in p_upper_others), default=-math.inf)
    return max(0.0, 0.5 * sigma * (normal_ppf(p_lower) - top_other))


def prediction_alphas(num_classes: int, runner_ups: int, alpha: float, split: str = "runner_up"
                      ) -> tuple[float, float, float]:
    """
    Union-bound split of α over the bounds of a prediction certificate, fixed before the estimation samples: returns
    (α of the predicted class's lower bound, α of each runner-up's upper bound, α of the rest). The runner-ups are the
    `runner_ups` classes ranked highest on the selection samples.

    - `"runner_up"`: the other K − 1 − `runner_ups` classes share **one** upper bound, on E[max_{k ∈ rest} s_k] ≥
      max_{k ∈ rest} p_k (a max of scores is itself a [0, 1] score), so there are `runner_ups` + 2 bounds, each at
      α / (`runner_ups` + 2), whatever K.
    - `"flat"`: one bound per class at α/K (Bonferroni); the rest value is then each remaining class's α.
    """
    if split == "flat":
        return alpha / num_classes, alpha / num_classes, alpha / num_classes
    if split != "runner_up":
        raise ValueError(f"`alpha_split` must be 'runner_up' or 'flat', got {split!r}.")
    groups = runner_ups + 1 + (num_classes - 1 - runner_ups > 0)
    share = alpha / groups
    return share, share, share if num_classes - 1 - runner_ups > 0 else 0.0
