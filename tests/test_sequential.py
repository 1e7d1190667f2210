"""Sequential certification: `certify(..., n=max_n, target_cosine=... | target_radius=...)` stops as soon as the
certificate is reached (or can no longer be), validly, because the betting bound is a confidence sequence."""

import pytest

from hf_feature_smoothing import FeatureSmoothingConfig, SmoothedVisionTower
from hf_feature_smoothing.certification import certify
from hf_feature_smoothing.statistics.bounds import certified_radius, fcsb

from .toy_encoders import ToyEncoder, toy_image, toy_images


@pytest.mark.parametrize("kind, alpha", [("sign", 0.05), ("sign", 0.2), ("angle", 0.2)])
def test_sequential_stopping_is_valid(kind, alpha):
    """Target set just above the true S: every run that stops with "reached" makes a false claim. Over 2000
    independent images the claimed S_low exceeds the truth in ≤ α of them, although each run looks at its bound after
    every sample and stops as soon as it can."""
    sigma, epsilon, trials = 0.25, 0.1, 2000
    encoder = ToyEncoder(kind)
    tower = SmoothedVisionTower(encoder, FeatureSmoothingConfig(sigma=sigma, chunk_size=4096))
    starts = [0.3 + 1e-6 * i for i in range(trials)]
    truths = [encoder.true_score(x, sigma) for x in starts]
    target = fcsb(max(truths) + 1e-6, epsilon, sigma)
    certificates = certify(tower, toy_images(starts), epsilon=epsilon, n=150, alpha=alpha, reference="clean",
                           target_cosine=target, seed=0)
    misses = sum(c.score_lower > t for c, t in zip(certificates, truths))
    assert misses / trials <= alpha
    assert sum(c.stop == "target" for c in certificates) <= misses  # reaching the target is a false claim
    assert all(c.n_used <= 150 for c in certificates) and any(c.stop == "unreachable" for c in certificates)


def test_sequential_stops_early_when_the_target_is_easy_or_out_of_reach():
    sigma = 0.25
    encoder = ToyEncoder("angle")  # S = (1 + exp(-σ²/2))/2 ≈ 0.985
    tower = SmoothedVisionTower(encoder, FeatureSmoothingConfig(sigma=sigma, chunk_size=32))
    target = fcsb(0.95, 0.1, sigma)
    (easy,) = certify(tower, toy_image(0.3), epsilon=0.1, n=4000, alpha=0.001, target_cosine=target, seed=0)
    assert easy.stop == "target" and easy.n_used < 400 and easy.fcsb[0] >= target
    (fixed,) = certify(tower, toy_image(0.3), epsilon=0.1, n=4000, alpha=0.001, seed=0)
    assert fixed.stop == "n" and fixed.n_used == 4000 and fixed.fcsb[0] > easy.fcsb[0]
    (hopeless,) = certify(tower, toy_image(0.3), epsilon=0.1, n=4000, alpha=0.001, seed=0,
                          target_cosine=fcsb(0.995, 0.1, sigma))
    assert hopeless.stop == "unreachable" and hopeless.n_used < 4000 and hopeless.fcsb[0] < fcsb(0.995, 0.1, sigma)
    (radius,) = certify(tower, toy_image(0.3), tau=0.5, n=4000, alpha=0.001, target_radius=0.3, seed=0)
    assert radius.stop == "target" and radius.radius[0] >= 0.3 and radius.n_used < 4000
    assert certified_radius(radius.score_lower, sigma, 0.5) >= 0.3
    record = easy.to_dict()
    assert record["target_cosine"] == target and record["n"] == 4000 and record["n_used"] == easy.n_used


@pytest.mark.parametrize("kwargs, match", [
    (dict(target_cosine=0.5, bound="bernstein"), "betting"), (dict(target_cosine=1.0), "target_cosine"),
    (dict(target_cosine=float("nan")), "target_cosine"), (dict(target_radius=-0.1), "target_radius"),
    (dict(target_cosine=0.5, epsilon=[]), "epsilon"), (dict(target_radius=0.1, tau=[]), "tau"),
    (dict(target_cosine=0.9, epsilon=5.0, sigma=0.01), "unreachable"),
])
def test_sequential_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        certify(ToyEncoder("angle"), toy_image(0.3), **kwargs)


def test_a_target_that_n_samples_cannot_reach_is_refused_with_the_n_that_can():
    """Within reach at σ but not with `n` samples, even if every score were 1: sampling would stop after one sample
    with a vacuous certificate. The feature and vote paths refuse it before sampling, naming an n that works; with
    that n the bound does reach the target on all-1 scores, and nothing reaches it sooner than all-1 scores do."""
    import re

    import torch

    from hf_feature_smoothing.statistics.betting import BettingTest, best_case_reach
    from hf_feature_smoothing.statistics.vote import VoteBound, certify_vote, vote_target

    def named_n(error) -> int:
        return int(re.search(r"Raise `n` \(to (\d+)\)", str(error.value)).group(1))

    tower = SmoothedVisionTower(ToyEncoder("angle"), FeatureSmoothingConfig(sigma=0.25))
    with pytest.raises(ValueError, match=r"out of reach with `n` 64 at σ=0.25 and α=0.001: it needs S ≥") as error:
        certify(tower, toy_image(0.3), epsilon=0.1, target_cosine=0.97, n=64, alpha=0.001)
    enough = named_n(error)
    (certificate,) = certify(tower, toy_image(0.3), epsilon=0.1, target_cosine=0.97, n=enough, alpha=0.001, seed=0)
    assert certificate.n_used > 1
    with pytest.raises(ValueError, match=r"out of reach with `n` 500 at σ=0.12 .* the radius is 0.258") as error:
        certify_vote(torch.tensor([0, 9]), torch.ones(500), sigma=0.12, alpha=0.001, target_radius=0.5)
    target = vote_target(0.5, 0.12)
    enough = named_n(error)
    assert best_case_reach(target, 0.001, enough) is not None and best_case_reach(target, 0.001, enough // 2) is None
    bound = VoteBound(0.001, 500, vote_target(0.5, 0.5))  # reachable: all hits stop at the predicted sample
    bound.update(torch.ones(500))
    assert bound.stop == "target" and bound.n_used == best_case_reach(vote_target(0.5, 0.5), 0.001, 500) == 51
    generator = torch.Generator().manual_seed(0)
    for mean in (0.6, 0.9, 0.99):  # scores in [0, 1], near 1 or hits: never sooner than the best case
        first = best_case_reach(mean, 0.01, 2000)
        for _ in range(20):
            scores = torch.where(torch.rand(2000, generator=generator) < 0.98, 1.0,
                                 torch.rand(2000, generator=generator))
            reached, _ = BettingTest(mean, 0.01, 2000).update(scores)
            assert reached is None or reached >= first


def test_cli_certifies_sequentially_in_the_fastest_supported_dtype(image_folder, tmp_path):
    from hf_feature_smoothing.cli import main
    from hf_feature_smoothing.runs.records import read_run
    from hf_feature_smoothing.utils.hardware import bf16_supported

    dtype = "bfloat16" if bf16_supported("cpu") else "float32"  # bf16 is refused on CPUs without native support
    out = tmp_path / "cert.jsonl"
    assert main(["certify", "--model", "tiny-llava", "--images", str(image_folder), "--n", "400", "--n0", "16",
                 "--epsilon", "0.0", "--target-cosine", "0.05", "--dtype", dtype, "--seed", "3",
                 "--output", str(out)]) == 0
    rows = read_run(out).rows  # the header line holds the run parameters
    assert rows and all(r["dtype"] == dtype and r["seed"] == 3 and r["bound"] == "betting" for r in rows)
    assert all(r["reference"] == "smoothed" and r["stop"] in ("target", "unreachable", "n") for r in rows)
    assert any(r["n_used"] < 400 for r in rows)
