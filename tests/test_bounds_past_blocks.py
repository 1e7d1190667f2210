"""Soundness past the betting bound's time blocks. Version 0.1.0 walked time in blocks of 4096 scores and carried the
capital from one block to the next through a view of a tensor it then clamped and exponentiated in place: every
betting bound over more than 4096 scores was invalid (its miss rate far above α). These tests cross many blocks,
through the capital's test, `lower_confidence_bound`, `certify` and `certify_prediction`, and run the same checks on
that released carry (`broken_carry`) to show they catch it."""

import math
from collections.abc import Callable

import pytest
import torch

from hf_feature_smoothing import FeatureSmoothingConfig, SmoothedVisionTower
from hf_feature_smoothing.certification import certify, certify_prediction
from hf_feature_smoothing.statistics import betting
from hf_feature_smoothing.statistics.betting import BettingTest, betting_lower_bound, betting_rejects
from hf_feature_smoothing.statistics.bounds import (
    fcsb,
    lower_confidence_bound,
    moment_upper_bound,
    normal_ppf,
    upper_confidence_bound,
)

from .toy_encoders import ToyEncoder, toy_images


RESOLUTION = 4.0**-betting._ROUNDS  # the width of the search's last bracket


def _released_max_log_capital(scores, bets_all, means, truncations, threshold):
    """`_max_log_capital` as released in 0.1.0: `carry` is a view of `log_capital`, which is then clamped and
    exponentiated in place, so the next block starts from exp(min(log K, cap)) instead of log K. (It takes a
    threshold per sequence, as `_max_log_capital` now does; 0.1.0 took one for all.)"""
    batch, n = scores.shape
    grid = means.shape[-1]
    cap = threshold + math.log(len(truncations)) + 1.0
    if torch.is_tensor(cap):
        cap = cap[:, :, None, None]
    caps = torch.tensor(list(truncations), dtype=scores.dtype) / means[..., None]
    carry = torch.zeros(batch, grid, len(truncations), dtype=scores.dtype)
    best = torch.zeros(batch, grid, dtype=scores.dtype)
    for start in range(0, n, betting._TIME_BLOCK):
        excess = (scores[:, start : start + betting._TIME_BLOCK, None] - means[:, None, :])[..., None]
        bets = torch.minimum(bets_all[:, start : start + betting._TIME_BLOCK, None, None], caps[:, None])
        log_capital = torch.log1p(bets * excess).cumsum(1).add_(carry[:, None])
        carry = log_capital[:, -1]
        best = torch.maximum(best, log_capital.clamp_max_(cap).exp_().sum(-1).amax(1))
    return torch.log(best / len(truncations))


@pytest.fixture
def broken_carry(monkeypatch):
    monkeypatch.setattr(betting, "_max_log_capital", _released_max_log_capital)


def _within_level(misses: int, trials: int, alpha: float) -> bool:
    """The miss count is consistent with a miss rate ≤ α: at most α·trials plus 3 binomial standard deviations (a
    valid bound fails this by chance with probability < 0.2 %; the seeds are fixed, so the test is deterministic)."""
    return misses <= alpha * trials + 3 * math.sqrt(trials * alpha * (1 - alpha))


def _misses_until_decided(count: Callable[[range], int], trials: int, alpha: float, chunk: int = 500) -> int:
    """The misses of `trials` trials, counted `chunk` trials at a time (`count(range of trial indices)`), stopping
    once they exceed what `_within_level` allows: the check has failed then, whatever the other trials give. A
    bound that passes runs every trial; a broken one is caught without them. A trial's outcome does not depend on
    the chunks: a certificate's noise depends on its image and the seed only, a sequence's test on its own scores."""
    misses = 0
    for start in range(0, trials, chunk):
        misses += count(range(start, min(start + chunk, trials)))
        if not _within_level(misses, trials, alpha):
            break
    return misses


def _scores(distribution: str, trials: int, n: int, seed: int) -> tuple[torch.Tensor, float]:
    """`(trials, n)` scores and their true mean: Bernoulli(0.8) (no bet is truncated at large n) or concentrated
    Beta (mean 0.95, variance 1e-4: the truncations bind, the mixture's components differ)."""
    generator = torch.Generator().manual_seed(seed)
    if distribution == "bernoulli":
        return (torch.rand(trials, n, generator=generator, dtype=torch.float64) < 0.8).double(), 0.8
    k = 0.95 * 0.05 / 1e-4 - 1
    beta = torch.distributions.Beta(torch.tensor(0.95 * k, dtype=torch.float64), torch.tensor(0.05 * k, dtype=torch.float64))
    torch.manual_seed(seed)
    return beta.sample((trials, n)), 0.95


# ----- the same scores, the same bound, whatever the blocks ----------------------------------------------------------
@pytest.mark.parametrize("distribution", ["bernoulli", "beta"])
def test_blocked_and_unblocked_bounds_agree_on_long_sequences(monkeypatch, distribution):
    scores, _ = _scores(distribution, 12, 10_000, seed=1)
    results = {}
    for block in (64, 4096, 10**6):
        monkeypatch.setattr(betting, "_TIME_BLOCK", block)
        results[block] = (betting_lower_bound(scores, 0.01),
                          torch.tensor([upper_confidence_bound(s, 0.01) for s in scores[:3]]))
    for block in (64, 10**6):
        assert (results[block][0] - results[4096][0]).abs().max() <= RESOLUTION, block
        assert (results[block][1] - results[4096][1]).abs().max() <= RESOLUTION, block
    one_by_one = torch.stack([betting_lower_bound(s, 0.01) for s in scores])  # sequence groups do not matter
    assert (one_by_one - results[10**6][0]).abs().max() <= RESOLUTION


def test_streaming_test_agrees_with_the_batch_test_whatever_the_chunks():
    """`BettingTest` (no time blocks, any chunking) rejects exactly when the blocked batch capital does."""
    scores, truth = _scores("bernoulli", 200, 10_000, seed=2)
    for mean in (truth - 0.004, truth):
        batch = betting_rejects(scores, mean, 0.2)
        streamed = []
        for row in scores:
            test = BettingTest(mean, 0.2, horizon=10_000)
            streamed.append(any(test.update(chunk)[0] is not None for chunk in row.split(4097)))
        assert torch.tensor(streamed).equal(batch), mean
        assert 0 < int(batch.sum()) < 200  # both outcomes occur
    row = scores[0]
    outcomes = set()
    for size in (13, 1000, 10_000):
        test = BettingTest(truth - 0.004, 0.2, horizon=10_000)
        results = [test.update(chunk) for chunk in row.split(size)]
        outcomes.add((next((r for r, _ in results if r), None), next((h for _, h in results if h), None)))
    assert len(outcomes) == 1, outcomes


# ----- coverage past several blocks ---------------------------------------------------------------------------------
@pytest.mark.parametrize("distribution, n, alpha", [
    *[("bernoulli", n, alpha) for n in (4097, 10_000, 40_000) for alpha in (0.05, 0.2)],
    ("beta", 4097, 0.2), ("beta", 10_000, 0.2)])
def test_the_true_mean_is_rejected_at_most_alpha_at_every_n(distribution, n, alpha):
    """Ville's inequality for the capital behind every betting bound, 2000 trials per cell (Bernoulli: the bets are
    never truncated; Beta: they are, so the components of the mixture differ). `betting_lower_bound` only reports
    means this test rejects and rejection is monotone in the mean, so its miss rate (bound > truth) is at most this
    rate (checked directly below)."""
    scores, truth = _scores(distribution, 2000, n, seed=n)
    misses = _rejections(scores, truth, alpha)
    assert _within_level(misses, 2000, alpha), misses


def _rejections(scores: torch.Tensor, truth: float, alpha: float) -> int:
    """How many of the sequences (rows) reject the true mean, until decided."""
    return _misses_until_decided(lambda trial: int(betting_rejects(scores[trial.start : trial.stop], truth,
                                                                    alpha).sum()), len(scores), alpha)


@pytest.mark.parametrize("alpha, side", [(0.05, "lower"), (0.2, "lower"), (0.2, "upper")])
def test_lower_and_upper_bounds_cover_across_many_blocks(monkeypatch, alpha, side):
    """The full search of `lower_confidence_bound` / `upper_confidence_bound` (1 − LCB(1 − X)) at n = 4097 with
    blocks of 256 scores (16 carries), 2000 trials."""
    monkeypatch.setattr(betting, "_TIME_BLOCK", 256)
    scores, truth = _scores("bernoulli", 2000, 4097, seed=3)
    if side == "upper":  # the upper bound on the mean 0.2 of 1 − X
        scores, truth = 1 - scores, 1 - truth
        highs = 1 - betting_lower_bound(1 - scores, alpha)
        assert _within_level(int((highs < truth).sum()), 2000, alpha)
        assert upper_confidence_bound(scores[0], alpha) == pytest.approx(highs[0].item(), abs=RESOLUTION)
        return
    lows = betting_lower_bound(scores, alpha)
    assert _within_level(int((lows > truth).sum()), 2000, alpha)
    assert not (lows > truth).logical_and(~betting_rejects(scores, truth, alpha)).any()  # miss ⇒ truth rejected
    assert lower_confidence_bound(scores[0], alpha) == pytest.approx(lows[0].item(), abs=RESOLUTION)


def test_the_released_carry_fails_the_same_check(broken_carry):
    scores, truth = _scores("bernoulli", 2000, 10_000, seed=10_000)
    assert not _within_level(_rejections(scores, truth, 0.2), 2000, 0.2)


# ----- through certify / certify_prediction on encoders with known smoothing -----------------------------------------
def _feature_misses(kind: str, alpha: float, target: bool = False) -> int:
    """Misses (S_low above the closed-form S) of 2000 certificates, n = 100 in blocks of 32 (3 carries), until
    decided."""
    sigma, epsilon, trials = 0.25, 0.1, 2000
    encoder = ToyEncoder(kind)
    tower = SmoothedVisionTower(encoder, FeatureSmoothingConfig(sigma=sigma, chunk_size=4096))
    starts = [0.3 + 1e-5 * i for i in range(trials)]
    truths = [encoder.true_score(x, sigma) for x in starts]
    extra = {"target_cosine": fcsb(max(truths) + 1e-6, epsilon, sigma)} if target else {}

    def count(trial: range) -> int:
        certificates = certify(tower, toy_images(starts[trial.start : trial.stop]), epsilon=epsilon, n=100,
                               alpha=alpha, reference="clean", seed=7, **extra)
        return sum(c.score_lower > truths[i] for c, i in zip(certificates, trial))

    return _misses_until_decided(count, trials, alpha)


@pytest.mark.parametrize("kind, alpha, target", [("sign", 0.05, False), ("angle", 0.2, False), ("sign", 0.2, True)])
def test_certify_covers_the_closed_form_truth_across_many_blocks(monkeypatch, kind, alpha, target):
    monkeypatch.setattr(betting, "_TIME_BLOCK", 32)
    assert _within_level(_feature_misses(kind, alpha, target), 2000, alpha)


def test_certify_with_the_released_carry_fails_the_same_check(broken_carry, monkeypatch):
    monkeypatch.setattr(betting, "_TIME_BLOCK", 32)
    assert not _within_level(_feature_misses("angle", 0.2), 2000, 0.2)


def _prediction_misses(alpha: float) -> int:
    """Wrong claims among 2000 prediction certificates on the angle encoder with six prototypes (p_k in closed form,
    class 0 the smoothed prediction), until decided: a certified prediction other than 0, a radius above the true
    Lipschitz radius, or p̲_y above the true p_y."""
    sigma, trials = 0.25, 2000
    encoder = ToyEncoder("angle")
    tower = SmoothedVisionTower(encoder, FeatureSmoothingConfig(sigma=sigma, chunk_size=4096))
    angles = 0.4 + torch.tensor([0.0, 0.8, -0.8, 1.0, 2.0, 3.0])
    prototypes = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    starts = [0.4 + 1e-5 * i for i in range(trials)]

    def count(trial: range) -> int:
        certificates = certify_prediction(tower, toy_images(starts[trial.start : trial.stop]), prototypes, n=64,
                                          n0=16, alpha=alpha, seed=7, method="margin")
        misses = 0
        for c, i in zip(certificates, trial):
            p = encoder.true_prototype_scores(starts[i], sigma, angles)
            truth = max(0.0, sigma / 2 * (normal_ppf(p[0].item()) - normal_ppf(p[1:].max().item())))
            misses += c.prediction is not None and (c.prediction != 0 or c.radius > truth or c.p_lower > p[0].item())
        assert sum(c.prediction == 0 for c in certificates) > len(trial) / 2  # the check has something to check
        return misses

    return _misses_until_decided(count, trials, alpha)


def test_certify_prediction_covers_the_closed_form_truth_across_many_blocks(monkeypatch):
    monkeypatch.setattr(betting, "_TIME_BLOCK", 16)
    assert _within_level(_prediction_misses(0.2), 2000, 0.2)


def test_certify_prediction_with_the_released_carry_fails_the_same_check(broken_carry, monkeypatch):
    monkeypatch.setattr(betting, "_TIME_BLOCK", 16)
    assert not _within_level(_prediction_misses(0.2), 2000, 0.2)


@pytest.mark.parametrize("method", ["hoeffding", "bernstein"])
def test_fixed_n_bounds_and_streaming_moments_cover_at_large_n(method):
    """The fixed-n bounds (lower and upper) and the upper bound from streaming moments (`certify_prediction`'s flat
    split) at n = 40 000, 2000 trials, α = 0.2."""
    alpha, n = 0.2, 40_000
    scores, truth = _scores("bernoulli", 2000, n, seed=5)
    lows = torch.tensor([lower_confidence_bound(s, alpha, method) for s in scores])
    highs = torch.tensor([upper_confidence_bound(s, alpha, method) for s in scores])
    means, variances = scores.mean(1), scores.var(1)
    from_moments = torch.tensor([moment_upper_bound(m.item(), v.item(), n, alpha, method)
                                 for m, v in zip(means, variances)])
    for misses in ((lows > truth).sum(), (highs < truth).sum(), (from_moments < truth).sum()):
        assert _within_level(int(misses), 2000, alpha), misses
