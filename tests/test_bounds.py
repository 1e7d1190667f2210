import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_feature_smoothing.statistics import betting, bounds
from hf_feature_smoothing.statistics.betting import BettingTest, betting_lower_bound
from hf_feature_smoothing.statistics.bounds import (
    certified_radius,
    class_confidence_bounds,
    empirical_bernstein_lower_bound,
    fcsb,
    hoeffding_lower_bound,
    lower_confidence_bound,
    normal_cdf,
    normal_ppf,
    prediction_alphas,
    prediction_radius,
    score_for_certificate,
    upper_confidence_bound,
)


# Reference values from the design notes (paper-notes §2.4), σ = 1 so r = ε/σ.
FCSB_TABLE = {
    0.60: [0.2000, 0.1219, 0.0027, -0.1948, -0.5447],
    0.75: [0.5000, 0.4344, 0.3288, 0.1385, -0.2552],
    0.80: [0.6000, 0.5417, 0.4459, 0.2674, -0.1258],
    0.90: [0.8000, 0.7626, 0.6977, 0.5655, 0.2217],
    0.95: [0.9000, 0.8776, 0.8369, 0.7477, 0.4810],
    0.99: [0.9800, 0.9740, 0.9621, 0.9322, 0.8153],
    0.999: [0.9980, 0.9972, 0.9955, 0.9904, 0.9634],
}
RADIUS_TABLE = {
    0.75: [0.6745, 0.0, 0.0, 0.0],
    0.80: [0.8416, 0.1671, 0.0, 0.0],
    0.90: [1.2816, 0.6071, 0.0, 0.0],
    0.95: [1.6449, 0.9704, 0.3633, 0.0],
    0.99: [2.3263, 1.6519, 1.0448, 0.6815],
    0.999: [3.0902, 2.4157, 1.8087, 1.4454],
}


@pytest.mark.parametrize("score, expected", FCSB_TABLE.items())
def test_fcsb_table(score, expected):
    for r, value in zip([0, 0.1, 0.25, 0.5, 1.0], expected):
        assert fcsb(score, epsilon=r * 0.5, sigma=0.5) == pytest.approx(value, abs=1e-4)


@pytest.mark.parametrize("score, expected", RADIUS_TABLE.items())
def test_radius_table(score, expected):
    for tau, value in zip([0, 0.5, 0.8, 0.9], expected):
        assert certified_radius(score, sigma=2.0, tau=tau) == pytest.approx(2.0 * value, abs=2e-4)


@pytest.mark.parametrize(
    "x, phi",
    [(0.0, 0.5), (1.0, 0.8413447461), (-1.959963985, 0.025), (8.0, 1 - 6.22e-16), (-math.inf, 0.0), (math.inf, 1.0)],
)
def test_normal_cdf_table(x, phi):
    assert normal_cdf(x) == pytest.approx(phi, abs=1e-9)


@pytest.mark.parametrize(
    "p, q", [(0.5, 0.0), (0.975, 1.959963985), (1e-10, -6.361340902), (0.0, -math.inf), (1.0, math.inf)]
)
def test_normal_ppf_table(p, q):
    assert normal_ppf(p) == pytest.approx(q, abs=1e-7)


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_normal_ppf_rejects_non_probabilities(p):
    with pytest.raises(ValueError, match="`p`"):
        normal_ppf(p)


def test_fcsb_properties():
    for score in [0.55, 0.7, 0.9, 0.99]:
        assert fcsb(score, 0.0, 0.25) == pytest.approx(2 * score - 1)
        values = [fcsb(score, e, 0.25) for e in [0, 0.05, 0.1, 0.3, 1.0]]
        assert values == sorted(values, reverse=True)
        for e in [0.05, 0.1, 0.3, 1.0]:  # never weaker than the linear Lipschitz bound
            assert fcsb(score, e, 0.25) >= 2 * score - 1 - math.sqrt(2 / math.pi) * e / 0.25 - 1e-12
        assert certified_radius(score, 0.25, 0.5) == pytest.approx(max(0, 0.25 * (normal_ppf(score) - 0.6744897502)))
    assert fcsb(1.0, 0.3, 0.25) == 1.0 and fcsb(0.0, 0.0, 0.25) == -1.0
    with pytest.raises(ValueError, match="sigma"):
        fcsb(0.9, 0.1, 0.0)
    with pytest.raises(ValueError, match="tau"):
        certified_radius(0.9, 0.25, 1.0)


def test_bernstein_is_tighter_for_concentrated_scores_and_margins_match_notes():
    n, alpha = 1000, 1e-3
    assert 0.9 - hoeffding_lower_bound(torch.full((n,), 0.9), alpha) == pytest.approx(0.0588, abs=1e-3)
    scores = torch.cat([torch.full((n // 2,), 0.95 - math.sqrt(0.001)), torch.full((n // 2,), 0.95 + math.sqrt(0.001))])
    assert scores.var().item() == pytest.approx(0.001, rel=0.01)
    margin = scores.double().mean().item() - empirical_bernstein_lower_bound(scores, alpha)
    assert margin == pytest.approx(0.022, abs=1.5e-3)  # notes: EB, V = 0.001, N = 1000 → 0.022
    assert empirical_bernstein_lower_bound(torch.tensor([0.9]), alpha) == -math.inf


@pytest.mark.parametrize("method", ["hoeffding", "bernstein"])
@pytest.mark.parametrize("distribution", ["bernoulli", "beta"])
def test_lower_bound_coverage(method, distribution):
    """≥ 1 − α of 2000 independent bounds fall below the true mean."""
    generator = torch.Generator().manual_seed(0)
    alpha, n, trials = 0.05, 200, 2000
    if distribution == "bernoulli":
        truth = 0.8
        samples = (torch.rand(trials, n, generator=generator) < truth).double()
    else:
        beta = torch.distributions.Beta(torch.tensor(8.0), torch.tensor(2.0))
        torch.manual_seed(0)
        samples, truth = beta.sample((trials, n)).double(), 0.8
    covered = sum(lower_confidence_bound(s, alpha, method) <= truth for s in samples)
    uppers = sum(upper_confidence_bound(s, alpha, method) >= truth for s in samples)
    assert covered / trials >= 1 - alpha
    assert uppers / trials >= 1 - alpha


def test_lower_bound_rejects_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        lower_confidence_bound(torch.ones(3), 0.1, "clopper")
    with pytest.raises(ValueError, match="empty"):
        lower_confidence_bound(torch.ones(0), 0.1)


# ----- betting ------------------------------------------------------------------------------------------------------
def _beta(mean: float, var: float) -> torch.distributions.Beta:
    k = mean * (1 - mean) / var - 1
    return torch.distributions.Beta(torch.tensor(mean * k, dtype=torch.float64),
                                    torch.tensor((1 - mean) * k, dtype=torch.float64))


def _distributions():
    """(sampler(shape, generator) → [0, 1] scores, true mean): skewed, bimodal, discrete and concentrated."""
    def two_point(low, p_low):
        return (lambda shape, g: torch.where(torch.rand(shape, generator=g, dtype=torch.float64) < p_low, low, 1.0),
                p_low * low + (1 - p_low))

    def beta(mean, var):
        dist = _beta(mean, var)
        return (lambda shape, g: dist.sample(shape)), mean

    return {"bernoulli(0.8)": two_point(0.0, 0.2), "rare low (0.2 w.p. 0.05)": two_point(0.2, 0.05),
            "beta(8, 2)": beta(0.8, 0.8 * 0.2 / 11), "arcsine": beta(0.5, 0.125),
            "concentrated (0.95, 1e-4)": beta(0.95, 1e-4)}


def _miss_rates(lower_bound, alpha: float, n: int, trials: int = 2000, negate: bool = False) -> dict[str, float]:
    """Per distribution: the fraction of `trials` independent bounds above the true mean (`negate`: bounds given as
    −upper bound, a miss is upper < truth)."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    rates = {}
    for name, (sample, truth) in _distributions().items():
        scores = sample((trials, n), generator)
        rates[name] = (lower_bound(scores, alpha) > (-truth if negate else truth)).double().mean().item()
    return rates


def _normal_approximation(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """Deliberately invalid: mean − z₁₋α · sd/√n (the CLT at small n), the control of the coverage test."""
    z = normal_ppf(1 - alpha)
    return scores.mean(-1) - z * scores.std(-1) / math.sqrt(scores.shape[-1])


@pytest.mark.parametrize("alpha", [0.05, 0.2])
def test_betting_bound_covers_at_its_level_and_the_normal_approximation_does_not(alpha):
    """2000 trials per distribution: the betting bound misses the true mean in ≤ α of them (α = 0.2 makes any
    miscalibration visible); the same test catches the normal approximation."""
    rates = _miss_rates(betting_lower_bound, alpha, n=30)
    assert max(rates.values()) <= alpha, rates
    upper_misses = _miss_rates(lambda s, a: -(1 - betting_lower_bound(1 - s, a)), alpha, n=30, negate=True)
    assert max(upper_misses.values()) <= alpha, upper_misses  # the upper bound 1 − LCB(1 − X), by symmetry
    control = _miss_rates(_normal_approximation, alpha, n=30)
    assert max(control.values()) > alpha, control


@pytest.mark.parametrize("alpha", [0.05, 0.2])
def test_betting_bound_is_a_confidence_sequence(alpha):
    """The bound only rises with more scores (the capital's running maximum), so "the bound of *some* prefix exceeds
    the truth" is the event "the final bound exceeds it": ≤ α of 2000 trials at n = 60. Stopping at any
    data-dependent time is therefore valid."""
    generator = torch.Generator().manual_seed(1)
    scores = _beta(0.9, 0.01).sample((3, 60))
    prefixes = torch.stack([betting_lower_bound(scores[:, :t], alpha, horizon=60) for t in range(1, 61)], dim=1)
    assert (prefixes.diff(dim=1) >= -1e-7).all()
    for name, (sample, truth) in _distributions().items():
        final = betting_lower_bound(sample((2000, 60), generator), alpha, horizon=60)
        assert (final > truth).double().mean().item() <= alpha, name


def test_betting_test_matches_the_batch_bound_and_never_gives_up_on_a_reachable_target():
    scores = _beta(0.95, 1e-4).sample((600,))
    low = betting_lower_bound(scores, 1e-3, horizon=600).item()
    reached_at = None
    test = BettingTest(low - 1e-5, 1e-3, horizon=600)
    for chunk in scores.split(50):
        reached, hopeless = test.update(chunk)
        assert hopeless is None
        reached_at = reached_at or reached
    assert reached_at is not None and reached_at <= 600
    # the target is reached exactly when the bound of that prefix reaches it
    assert betting_lower_bound(scores[:reached_at], 1e-3, horizon=600) >= low - 1e-5 - 1e-6
    assert betting_lower_bound(scores[: reached_at - 1], 1e-3, horizon=600) < low - 1e-5 + 1e-6
    hopeless_test = BettingTest(0.99, 1e-3, horizon=600)  # truth 0.95: far out of reach, given up early
    stops = [hopeless_test.update(chunk) for chunk in scores.split(50)]
    assert any(h for _, h in stops) and all(r is None for r, _ in stops)
    assert next(h for _, h in stops if h) < 300


def test_betting_is_near_the_statistical_limit_and_beats_bernstein_and_hoeffding():
    """Concentrated scores as on real DINOv2 (mean 0.95, variance 1e-4), α = 1e-3: the loss S − S_low is within 1.25×
    the floor S·ln(1/α)/n of any valid bound at n ≥ 300 (design notes: 0.025 at 300, 0.0075 at 1000)."""
    torch.manual_seed(3)
    dist, alpha = _beta(0.95, 1e-4), 1e-3
    for n, expected in [(300, 0.025), (1000, 0.0075)]:
        scores = dist.sample((100, n))
        gap = (0.95 - betting_lower_bound(scores, alpha)).mean().item()
        floor = 0.95 * math.log(1 / alpha) / n
        assert gap <= 1.25 * floor and gap == pytest.approx(expected, rel=0.08)
        eb = sum(0.95 - empirical_bernstein_lower_bound(s, alpha) for s in scores[:20]) / 20
        assert gap < 0.6 * eb and gap < 0.6 * (0.95 - hoeffding_lower_bound(scores[0], alpha))


def test_hoeffding_beats_bernstein_at_every_n_for_high_variance_scores():
    generator = torch.Generator().manual_seed(4)
    for n in [10, 100, 1000, 10000]:
        scores = (torch.rand(n, generator=generator) < 0.5).double()
        assert hoeffding_lower_bound(scores, 1e-3) > empirical_bernstein_lower_bound(scores, 1e-3)


def test_betting_search_reports_only_rejected_means_and_is_monotone():
    scores = torch.tensor([0.9, 0.95, 1.0, 0.97] * 25, dtype=torch.float64)
    low = betting_lower_bound(scores, 0.01)
    bets = betting.plug_in_bets(scores[None], 0.01, 100)
    grid = torch.tensor([[low.item(), low.item() + 1e-4, 0.99]], dtype=torch.float64)
    capital = betting._max_log_capital(scores[None], bets, grid, betting.TRUNCATIONS, math.log(100))[0]
    assert capital[0] >= math.log(100) > capital[1] and capital[1] >= capital[2]
    assert betting_lower_bound(torch.ones(50), 0.01) > 0.85 and betting_lower_bound(torch.zeros(50), 0.01) == 0


@pytest.mark.parametrize("time_block", [16, 4096])
def test_bounds_at_one_level_per_sequence_are_those_computed_one_by_one(monkeypatch, time_block):
    """A prediction certificate's class bounds (each at its own α) searched together give the bounds of separate
    searches (up to float rounding: a shared search may take the other of two equivalent code paths), in every
    method; the levels must match the sequences."""
    monkeypatch.setattr(betting, "_TIME_BLOCK", time_block)
    generator = torch.Generator().manual_seed(3)
    for n in (7, 64, 1000):
        scores = torch.rand(n, 6, generator=generator, dtype=torch.float64).pow(torch.tensor([0.1, 1, 2, 3, 4, 5]))
        alphas = [0.002, 0.0005, 0.0005, 0.0005, 0.0005, 0.0003]
        for method in ("betting", "bernstein", "hoeffding"):
            low, highs = class_confidence_bounds(scores, alphas, method, n)
            assert low == pytest.approx(lower_confidence_bound(scores[:, 0], alphas[0], method, n), abs=1e-12)
            assert highs == pytest.approx([upper_confidence_bound(scores[:, k], alphas[k], method, n)
                                           for k in range(1, 6)], abs=1e-12)
    with pytest.raises(ValueError, match="one level in"):
        betting_lower_bound(torch.rand(3, 10), torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="one level in"):
        betting_lower_bound(torch.rand(2, 10), torch.tensor([0.1, 1.0]))
    with pytest.raises(ValueError, match="one level per column"):
        class_confidence_bounds(torch.rand(0, 3), [0.1] * 3)
    with pytest.raises(ValueError, match="one level per column"):
        class_confidence_bounds(torch.rand(5, 3), [0.1] * 2)


def test_score_for_certificate_inverts_fcsb_and_radius():
    for cosine, epsilon, sigma in [(0.5, 0.1, 0.25), (0.8, 0.05, 0.12), (0.3, 0.0, 0.5)]:
        score = score_for_certificate(cosine, epsilon, sigma)
        assert fcsb(score, epsilon, sigma) == pytest.approx(cosine, abs=1e-9)
        assert certified_radius(score, sigma, cosine) == pytest.approx(epsilon, abs=1e-9)
    with pytest.raises(ValueError, match="cosine"):
        score_for_certificate(1.0, 0.1, 0.25)


def test_prediction_alpha_splits_sum_to_alpha():
    for k, runner_ups in [(2, 1), (5, 4), (1000, 4)]:
        a_y, a_r, a_rest = prediction_alphas(k, runner_ups, 0.01, "flat")
        assert a_y + runner_ups * a_r + (k - 1 - runner_ups) * a_rest == pytest.approx(0.01)
        a_y, a_r, a_rest = prediction_alphas(k, runner_ups, 0.01)  # the rest share one bound
        assert a_y + runner_ups * a_r + a_rest == pytest.approx(0.01)
    assert prediction_alphas(1000, 4, 0.01) == pytest.approx((0.01 / 6,) * 3)
    with pytest.raises(ValueError, match="alpha_split"):
        prediction_alphas(3, 2, 0.01, "bonferroni")


def test_prediction_radius():
    assert prediction_radius(0.9, [0.5, 0.6], sigma=0.5) == pytest.approx(0.25 * (normal_ppf(0.9) - normal_ppf(0.6)))
    assert prediction_radius(0.55, [0.6], sigma=0.5) == 0.0


def test_statistics_core_does_not_import_transformers():
    folder = Path(bounds.__file__).parent
    code = (  # bounds.py and betting.py as a bare package, without the package's __init__ (which loads models)
        "import importlib, sys, types, torch\n"
        f"package = types.ModuleType('stats'); package.__path__ = [{str(folder)!r}]; sys.modules['stats'] = package\n"
        "module = importlib.import_module('stats.bounds')\n"
        "assert module.fcsb(0.9, 0.1, 0.25) > 0 and module.lower_confidence_bound(torch.ones(9), 0.1) > 0.5\n"
        "assert 'transformers' not in sys.modules, 'bounds.py imported transformers'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bootstrap_interval_of_an_accuracy_covers_the_truth_and_is_reproducible():
    import random

    from hf_feature_smoothing.statistics.aggregates import bootstrap_ci

    rng, p, covered, trials = random.Random(0), 0.8, 0, 300
    for _ in range(trials):
        hits = [float(rng.random() < p) for _ in range(60)]
        low, high = bootstrap_ci(hits, resamples=1000, seed=1)
        covered += low <= p <= high
    assert 0.88 <= covered / trials <= 0.99  # a 95% interval (percentile bootstrap: approximate at n = 60)
    hits = [1.0] * 20 + [0.0] * 10
    assert bootstrap_ci(hits) == bootstrap_ci(hits) and bootstrap_ci([1.0] * 5) == (1.0, 1.0)
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_ci([])
