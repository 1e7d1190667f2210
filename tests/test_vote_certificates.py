"""Cohen et al.'s vote certificate with an anytime-valid bound: coverage with a known p_A (fixed n and stopped early at a
target radius), invalid bounds failing the same check, `certify_prediction(method="vote")` against a closed form, and
`certify_answer` on tiny random LLaVA and Qwen-VL models (stock with σ, smoothed with `num_samples=1`, with a
booster)."""

import logging
import math

import pytest
import torch
from transformers import BatchFeature

import hf_feature_smoothing as hfs
from hf_feature_smoothing import FeatureSmoothingConfig, SmoothedVisionTower
from hf_feature_smoothing.certification import certify_prediction
from hf_feature_smoothing.hub.sharing import certificate_eval_results
from hf_feature_smoothing.models.answer_certificates import _base_classifier, prompt_digest
from hf_feature_smoothing.models.answers import CandidateAnswers
from hf_feature_smoothing.statistics import vote
from hf_feature_smoothing.statistics.betting import betting_lower_bound
from hf_feature_smoothing.statistics.bounds import normal_cdf, normal_ppf
from hf_feature_smoothing.statistics.vote import VoteBound, certify_vote, top_class, vote_radius, vote_target
from hf_feature_smoothing.testing_utils import IMAGE_TOKEN_ID, tiny_inputs, tiny_model, tiny_smoothed_model

from .toy_encoders import ToyEncoder, toy_images


TRIALS, ALPHA, SIGMA = 2000, 0.1, 0.25
CANDIDATES = CandidateAnswers(tuple((20, 21, 30 + k, 40) for k in range(4)), tuple(f"answer {k}" for k in range(4)))


def _within_level(misses: int, trials: int, alpha: float) -> bool:
    """At most α·trials plus 3 binomial standard deviations (a valid bound fails by chance with probability < 0.2 %;
    the seeds are fixed, so the test is deterministic)."""
    return misses <= alpha * trials + 3 * math.sqrt(trials * alpha * (1 - alpha))


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors on a shared machine: one intra-op thread is much faster than waking OpenMP workers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def coarse_grid(monkeypatch):
    """A 10× coarser grid of candidate p_A (the bound's validity holds for any grid fixed in advance), for the
    coverage runs through `certify_prediction`; the statistics' own coverage runs use the shipped grid."""
    monkeypatch.setattr(vote, "VOTE_GRID_STEP", 0.1)


def _hits(p: float, n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(TRIALS, n, generator=generator, dtype=torch.float64) < p).double()


# ----- the statistics: Cohen's CERTIFY with a betting confidence sequence ---------------------------------------------
def test_vote_certificate_pieces():
    assert top_class(torch.tensor([3, 9, 9, 1])) == 1  # ties: the lowest index
    assert vote_radius(0.5, SIGMA) == 0.0 and vote_radius(0.3, SIGMA) == 0.0
    assert vote_radius(normal_cdf(1.0), SIGMA) == pytest.approx(SIGMA)
    assert vote_target(0.25, 0.25) == pytest.approx(normal_cdf(1.0))
    with pytest.raises(ValueError, match="target_radius"):
        vote_target(10.0, 0.25)
    with pytest.raises(ValueError, match="counts"):
        top_class(torch.tensor([4]))


def test_streamed_bound_is_the_one_shot_bound_and_a_grid_point_below_the_exact_betting_bound():
    hits = _hits(0.9, 300, seed=1)[:5]
    for row in hits:
        one_shot = VoteBound(0.01, 300)
        one_shot.update(row)
        streamed = VoteBound(0.01, 300)
        for chunk in row.split(7):
            streamed.update(chunk)
        assert (streamed.p_lower, streamed.hits, streamed.n_used, streamed.stop) == \
            (one_shot.p_lower, int(row.sum()), 300, "n")
        exact = betting_lower_bound(row, 0.01, 300).item()
        assert one_shot.p_lower <= exact + 1e-6  # only grid points the same test rejects
        assert normal_ppf(exact) - normal_ppf(one_shot.p_lower) <= vote.VOTE_GRID_STEP + 1e-6  # one grid step
    # early stop: the same stopping sample whatever the chunks, and the certificate reaches the target
    row = _hits(0.95, 400, seed=2)[0]
    results = []
    for size in (1, 13, 400):
        bound = VoteBound(0.01, 400, vote_target(0.2, SIGMA))
        for chunk in row.split(size):
            if bound.update(chunk):
                break
        results.append((bound.p_lower, bound.n_used, bound.hits, bound.stop))
    assert len(set(results)) == 1 and results[0][3] == "target" and results[0][1] < 400
    assert vote_radius(results[0][0], SIGMA) >= 0.2


def _vote_misses(p: float, n: int, target_radius: float | None, trials: int = TRIALS,
                 futility: bool = False) -> tuple[int, int]:
    """(misses: p̲_A above the true p, early stops) of `certify_vote` over `trials` Bernoulli(p) hit sequences."""
    misses = stops = 0
    for row in _hits(p, n, seed=n + round(1000 * p))[:trials]:
        result = certify_vote(torch.tensor([1, 5]), row, SIGMA, ALPHA, n=n, target_radius=target_radius,
                              futility=futility)
        misses += result.p_lower > p
        stops += result.stop == "target"
    return misses, stops


def test_vote_bound_covers_at_fixed_n():  # the shipped grid (VOTE_GRID_STEP = 0.01)
    misses, _ = _vote_misses(0.8, 64, None)
    print(f"vote bound, fixed n = 64: {misses} misses / {TRIALS} (α = {ALPHA})")
    assert _within_level(misses, TRIALS, ALPHA)


def test_vote_bound_covers_when_stopped_early_at_a_target_radius():
    """The target needs p̲_A ≥ 0.82 > p_A = 0.8: every early stop is a miss, so the bound is tested where optional
    stopping hurts most (the shipped grid, as in the fixed-n test)."""
    p, target = 0.8, SIGMA * normal_ppf(0.82)
    misses, stops = _vote_misses(p, 100, target)
    print(f"vote bound, early stop at R = {target:.3f}, n ≤ 100: {misses} misses / {TRIALS}, {stops} stops at the target")
    assert _within_level(misses, TRIALS, ALPHA)
    reachable, early = _vote_misses(0.95, 100, target, trials=200)  # a reachable target does stop early
    assert early > 100 and _within_level(reachable, 200, ALPHA)


def test_futility_stops_keep_the_bound_valid_and_rarely_give_up_on_a_reachable_target():
    """With `futility`, sampling also stops once p_A < Φ(R/σ) is established by an upper confidence sequence: the
    lower bound still covers at any such stop; with p_A at the target itself (the hardest case) the sequence gives
    up with probability ≤ α, while an uncorrected upper Clopper–Pearson bound re-checked after every sample gives up
    far more often; and hopeless images stop long before n."""
    stats = pytest.importorskip("scipy.stats")
    p, target = 0.8, SIGMA * normal_ppf(0.82)
    misses, _ = _vote_misses(p, 100, target, futility=True)
    print(f"vote bound with futility stops, R = {target:.3f}, n ≤ 100: {misses} misses / {TRIALS}")
    assert _within_level(misses, TRIALS, ALPHA)

    goal, n = 0.82, 200
    hits = _hits(goal, n, seed=7)
    # the upper sequence alone (a futility stop needs its rejection; a target stop before it only lowers the count)
    gave_up = sum(bool(VoteBound(ALPHA, n, goal, futility=True).upper.update_all(1.0 - row, hopeless=False)[0][0])
                  for row in hits)
    successes = hits.numpy().cumsum(1)
    t = torch.arange(1, n + 1).double().numpy()
    uppers = stats.beta.ppf(1 - ALPHA, successes + 1, t - successes)  # one-sided CP upper bound after each sample
    uppers[successes == t] = 1.0
    naive = int((uppers < goal).any(1).sum())
    print(f"p_A = target = {goal}, n ≤ {n}: futility stops {gave_up} / {TRIALS}, re-checked Clopper–Pearson {naive}")
    assert _within_level(gave_up, TRIALS, ALPHA) and not _within_level(naive, TRIALS, ALPHA)

    hopeless = [VoteBound(ALPHA, 2000, goal, futility=futility) for futility in (True, False)]
    for bound in hopeless:
        bound.update(_hits(0.5, 2000, seed=8)[0])
    assert hopeless[0].stop == "futile" and hopeless[0].n_used < 60 < hopeless[1].n_used
    with pytest.raises(ValueError, match="needs a `target`"):
        VoteBound(ALPHA, n, futility=True)


def test_invalid_bounds_fail_the_same_checks():
    """The plug-in estimate p̂_A at a fixed n, and a Clopper–Pearson bound re-checked after every sample (stopping
    when it reaches the target: optional stopping without correction), fail the checks the vote bound passes."""
    stats = pytest.importorskip("scipy.stats")
    hits = _hits(0.8, 64, seed=64 + 800)
    plug_in = int((hits.mean(1) > 0.8).sum())
    print(f"plug-in p̂_A, n = 64: {plug_in} misses / {TRIALS}")
    assert not _within_level(plug_in, TRIALS, ALPHA)

    hits = _hits(0.8, 100, seed=100 + 800).numpy()
    successes = hits.cumsum(1)
    t = torch.arange(1, 101).double().numpy()
    lows = stats.beta.ppf(ALPHA, successes, t - successes + 1)  # one-sided CP lower bound after each sample
    lows[successes == 0] = 0.0
    reached = lows >= 0.82
    stop = reached.argmax(1)
    final = lows[range(TRIALS), stop.tolist()]
    final[~reached.any(1)] = lows[~reached.any(1), -1]
    optional = int((final > 0.8).sum())
    print(f"Clopper–Pearson re-checked after every sample, n ≤ 100: {optional} misses / {TRIALS}")
    assert not _within_level(optional, TRIALS, ALPHA)
    assert _within_level(int((lows[:, -1] > 0.8).sum()), TRIALS, ALPHA)  # at the fixed n it is valid


# ----- certify_prediction(method="vote") on an encoder with a closed form ---------------------------------------------
def test_certify_prediction_vote_covers_the_closed_form_truth(coarse_grid):
    """Sign encoder, prototypes u and −u: the single-copy prediction is class 0 iff x₁ + δ₁ < 0.5, so
    p_A = Φ((0.5 − x₁)/σ) ≈ 0.85 here. A miss: a certified class other than 0, or p̲_A above the true p_A."""
    encoder = ToyEncoder("sign")
    tower = SmoothedVisionTower(encoder, FeatureSmoothingConfig(sigma=SIGMA, chunk_size=4096))
    prototypes = torch.stack([encoder.u.data, -encoder.u.data])
    starts = [0.24 + 1e-6 * i for i in range(TRIALS)]
    certificates = certify_prediction(tower, toy_images(starts), prototypes, labels=[0] * TRIALS, n0=8, n=64,
                                      alpha=ALPHA, seed=5, method="vote")
    misses = 0
    for c, x in zip(certificates, starts):
        p = encoder.true_score(x, SIGMA)
        misses += c.prediction is not None and (c.prediction != 0 or c.p_lower > p)
    print(f"certify_prediction(method='vote'): {misses} misses / {TRIALS} (α = {ALPHA})")
    assert _within_level(misses, TRIALS, ALPHA)
    assert sum(c.prediction == 0 for c in certificates) > TRIALS / 2  # the check has something to check
    first = certificates[0].to_dict()
    assert first["method"] == "vote" and first["n_used"] == 64 and first["radius"] == pytest.approx(
        SIGMA * normal_ppf(first["p_lower"])) and first["p_upper_runner_up"] == pytest.approx(1 - first["p_lower"])
    again = certify_prediction(tower, toy_images(starts[:3]), prototypes, n0=8, n=64, alpha=ALPHA, seed=5,
                               method="vote")
    assert [c.to_dict() for c in again] == [dict(c.to_dict(), label=None, correct=None) for c in certificates[:3]]
    stopped = certify_prediction(tower, toy_images([0.0]), prototypes, n0=8, n=2000, alpha=ALPHA, seed=5,
                                 method="vote", target_radius=0.2)[0]
    assert stopped.stop == "target" and stopped.n_used < 2000 and stopped.radius >= 0.2
    assert certify_prediction(tower, toy_images([0.24]), prototypes, n=8, seed=5)[0].method == "vote"  # default
    with pytest.raises(ValueError, match="alpha_split"):  # a margin-only argument is refused, never ignored
        certify_prediction(tower, toy_images([0.24]), prototypes, alpha_split="flat")
    with pytest.raises(ValueError, match="method"):
        certify_prediction(tower, toy_images([0.24]), prototypes, method="votes")
    with pytest.raises(ValueError, match="target_radius"):
        certify_prediction(tower, toy_images([0.24]), prototypes, method="margin", target_radius=0.1)
    with pytest.raises(ValueError, match="bound"):
        certify_prediction(tower, toy_images([0.24]), prototypes, method="vote", bound="hoeffding")


# ----- certify_answer on tiny random LLaVA models ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def models():
    return {"stock": tiny_model("llava"), "smoothed": tiny_smoothed_model("llava", num_samples=1, seed=0)}


def _forward_batches(model) -> tuple[list[int], object]:
    sizes: list[int] = []
    handle = model.register_forward_pre_hook(lambda _, args, kwargs: sizes.append(kwargs["input_ids"].shape[0]),
                                             with_kwargs=True)
    return sizes, handle


@pytest.mark.parametrize("kind", ["stock", "smoothed"])
def test_certify_answer_batches_copies_is_reproducible_and_records_everything(models, kind):
    model = models[kind]
    inputs = tiny_inputs(model)
    sizes, handle = _forward_batches(model)
    try:
        certificate = hfs.certify_answer(model, inputs, CANDIDATES, sigma=0.25, n0=10, n=20, alpha=0.01, seed=3,
                                         batch_size=8)
    finally:
        handle.remove()
    assert sizes == [8, 2, 8, 8, 4]  # n0 = 10 and n = 20 copies, 8 per forward pass
    again = hfs.certify_answer(model, inputs, CANDIDATES, sigma=0.25, n0=10, n=20, alpha=0.01, seed=3, batch_size=8)
    assert again.to_dict() == certificate.to_dict()  # bit-identical
    as_returned = BatchFeature(dict(inputs), tensor_type="pt")  # what a processor returns (a UserDict, not a dict)
    assert hfs.certify_answer(model, as_returned, CANDIDATES, sigma=0.25, n0=10, n=20, alpha=0.01, seed=3,
                              batch_size=8).to_dict() == certificate.to_dict()
    with pytest.raises(ValueError, match=r"got the keys \['input_ids'\]"):
        hfs.certify_answer(model, {"input_ids": inputs["input_ids"]}, CANDIDATES, sigma=0.25, n0=2, n=2)
    other_batches = hfs.certify_answer(model, inputs, CANDIDATES, sigma=0.25, n0=10, n=20, alpha=0.01, seed=3,
                                       batch_size=5)
    assert other_batches.counts == certificate.counts and other_batches.hits == certificate.hits
    record = certificate.to_dict()
    assert record["smoothed"] == (kind == "smoothed") and record["booster"] is None and record["booster_digest"] is None
    assert record["dtype"] == "float32" and record["method"] == "vote" and record["target_radius"] is None
    assert record["batch_size"] == 8 and record["base_classifier"].endswith("on one noisy copy x + δ")
    assert {k: record[k] for k in ("n0", "n", "alpha", "sigma", "seed", "resolution", "noise_space")} == {
        "n0": 10, "n": 20, "alpha": 0.01, "sigma": 0.25, "seed": 3, "resolution": [56, 56],
        "noise_space": "pixel [0,1], l2"}
    assert record["candidates"] == list(CANDIDATES.texts) and record["candidates_digest"] == CANDIDATES.digest()
    assert len(record["prompt_digest"]) == 16 and sum(record["counts"]) == 10 and record["n_used"] == 20
    assert set(record["versions"]) == {"hf_feature_smoothing", "transformers", "torch"}
    # p̲_A ≤ ½ here (this random model's answer flips under σ = 0.25 noise): it abstains
    assert record["p_lower"] <= 0.5 and record["answer"] is None and record["answer_text"] is None
    assert record["radius"] == 0.0
    fresh = hfs.certify_answer(model, inputs, CANDIDATES, sigma=0.25, n0=4, n=4, alpha=0.01)
    assert isinstance(fresh.seed, int)  # unseeded: a fresh seed, recorded


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_the_base_classifier_is_the_smoothed_model_with_one_sample(family):
    """A smoothed model with `num_samples=1` answers from one noisy copy drawn by its tower; the base classifier of
    `certify_answer` given the same copy gives the same candidate logits."""
    model = tiny_smoothed_model(family, num_samples=1, seed=11)
    inputs = tiny_inputs(model)
    prefixed, positions = CANDIDATES.with_prefix(inputs, 0)
    tower = model.smoothed_vision_tower
    images = hfs.ImageInputs(inputs["pixel_values"], inputs.get("image_grid_thw"))
    with torch.no_grad():
        smoothed = CANDIDATES.scores(model, prefixed, positions, images.pixel_values, images.image_grid_thw)
        clean = tower.family.to_image(images)
        noise = torch.randn((1, *clean.shape), generator=torch.Generator().manual_seed(11))
        copy = tower.family.noisy_copies(images, 1, tower.sigma, lambda _: noise)
        with _base_classifier(model, tower):
            base = CANDIDATES.scores(model, prefixed, positions, copy.pixel_values, copy.image_grid_thw)
    torch.testing.assert_close(base, smoothed, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_certify_answer_on_qwen_vl_batches_patch_flattened_copies(family):
    """Qwen-VL inputs (patch-flattened pixels, `image_grid_thw`, `mm_token_type_ids`): copies are batched, the vote
    does not depend on the batch size, the certificate records the image's resolution; malformed inputs are
    refused with the argument named."""
    model = tiny_smoothed_model(family, num_samples=1, seed=0)
    inputs = tiny_inputs(model)
    sizes, handle = _forward_batches(model)
    try:
        certificate = hfs.certify_answer(model, inputs, CANDIDATES, n0=6, n=10, alpha=0.01, seed=3, batch_size=4)
    finally:
        handle.remove()
    assert sizes == [4, 2, 4, 4, 2]
    again = hfs.certify_answer(model, inputs, CANDIDATES, n0=6, n=10, alpha=0.01, seed=3, batch_size=16)
    assert (again.counts, again.hits, again.p_lower) == (certificate.counts, certificate.hits, certificate.p_lower)
    record = certificate.to_dict()
    patch = model.config.vision_config.patch_size
    assert record["resolution"] == [4 * patch, 4 * patch] and record["smoothed"] and record["sigma"] == 0.25
    assert sum(record["counts"]) == 6 and record["n_used"] == 10
    # one prompt, one digest, whatever the image's size (Qwen's processor gives a bigger image more image tokens)
    ids = inputs["input_ids"][0].tolist()
    start = ids.index(IMAGE_TOKEN_ID)
    bigger = torch.tensor([ids[:start] + [IMAGE_TOKEN_ID] * 5 + ids[start:]])
    image_token = model.config.image_token_id
    assert prompt_digest(bigger, image_token_id=image_token) == prompt_digest(inputs["input_ids"],
                                                                             image_token_id=image_token)
    assert record["prompt_digest"] == prompt_digest(inputs["input_ids"], image_token_id=image_token)
    assert prompt_digest(bigger) != prompt_digest(inputs["input_ids"])  # LLaVA's digest: every token, as before
    two = tiny_inputs(model, num_images=2)
    with pytest.raises(ValueError, match="image_grid_thw"):
        hfs.certify_answer(model, two, CANDIDATES, n0=2, n=2, seed=0)
    with pytest.raises(ValueError, match="patch rows"):
        hfs.certify_answer(model, dict(inputs, pixel_values=inputs["pixel_values"][:-1]), CANDIDATES, n0=2, n=2)


def test_certifying_a_booster_at_a_sigma_it_was_not_trained_for_says_so(caplog):
    """Sound still (the certificate is about the model as conditioned), but not the booster's measured regime: an
    override of σ outside the booster's `sigmas` logs a warning naming both; its own σ or a trained one, none."""
    boosted = hfs.add_booster(tiny_smoothed_model("llava", num_samples=1, seed=0), hfs.GSBConfig(sigmas=[0.25, 0.5]))
    inputs = tiny_inputs(boosted)
    for sigma, warned in ((0.3, True), (0.5, False), (None, False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            certificate = hfs.certify_answer(boosted, inputs, CANDIDATES, sigma=sigma, n0=2, n=2, seed=1)
        message = "The booster is conditioned on σ=0.3 but was trained for σ in [0.25, 0.5]"
        assert (message in caplog.text) == warned and certificate.sigma == (sigma or 0.25)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        hfs.certify(boosted, inputs["pixel_values"], sigma=0.4, n=4, n0=2, seed=0, input_space="processed")
        hfs.certify(boosted, inputs["pixel_values"], sigma=0.4, n=4, n0=2, seed=1, input_space="processed")
    assert caplog.text.count("conditioned on σ=0.4") == 1  # the feature path says it too, once per setting
    caplog.clear()
    boosted.get_base_model().smoothing_config.sigma = 0.6  # an edit after loading: said at the next smoothed run
    with caplog.at_level(logging.WARNING), torch.no_grad():
        boosted(**inputs)
    assert "conditioned on σ=0.6 but was trained for σ in [0.25, 0.5]" in caplog.text


def test_certify_answer_stops_early_and_records_the_booster(models):
    model = models["stock"]
    inputs = tiny_inputs(model)
    certificate = hfs.certify_answer(model, inputs, CANDIDATES, sigma=0.02, n0=16, n=300, alpha=0.01, seed=3,
                                     target_radius=0.01)
    assert certificate.stop == "target" and certificate.n_used < 300 and certificate.radius >= 0.01
    assert certificate.answer is not None and certificate.answer_text == CANDIDATES.texts[certificate.answer]
    assert certificate.target_radius == 0.01 and certificate.label is None and certificate.correct is None
    # with the right candidate's index the certificate says whether it is right, and a model card can count it
    wrong = (certificate.answer + 1) % len(CANDIDATES.texts)
    labelled = [hfs.certify_answer(model, inputs, CANDIDATES, sigma=0.02, n0=16, n=300, alpha=0.01, seed=3,
                                   target_radius=0.01, label=label) for label in (certificate.answer, wrong)]
    assert [(c.label, c.correct) for c in labelled] == [(certificate.answer, True), (wrong, False)]
    assert labelled[0].to_dict() == {**certificate.to_dict(), "label": certificate.answer, "correct": True}
    (accuracy, *_) = certificate_eval_results(labelled, "toy", radii=(0.01,))
    assert accuracy.metric_type == "certified_accuracy" and accuracy.metric_value == 0.5
    for bad in (len(CANDIDATES.texts), -1, True, 1.0):
        with pytest.raises(ValueError, match="`label` must be the index of the right candidate"):
            hfs.certify_answer(model, inputs, CANDIDATES, sigma=0.02, n0=2, n=2, label=bad)
    # futility: the same copies and hits until a stop; an answer that reaches the target stops there as before
    futile = hfs.certify_answer(model, inputs, CANDIDATES, sigma=0.02, n0=16, n=300, alpha=0.01, seed=3,
                                target_radius=0.01, futility=True)
    assert futile.to_dict() == {**certificate.to_dict(), "futility": True} and not certificate.futility
    far = hfs.certify_answer(model, inputs, CANDIDATES, sigma=2.0, n0=16, n=300, alpha=0.01, seed=3,
                             target_radius=1.0, futility=True)  # at σ = 2 the tiny model's answers scatter
    assert far.stop == "futile" and far.n_used < 300 and far.radius < 1.0
    futile_labelled = hfs.certify_answer(model, inputs, CANDIDATES, sigma=0.02, n0=16, n=300, alpha=0.01, seed=3,
                                         target_radius=0.01, futility=True, label=certificate.answer)
    (entry, *_) = certificate_eval_results([futile_labelled], "toy", radii=(0.01,))
    assert "futility stop" in entry.metric_name and entry.metric_args["futility"] is True
    with pytest.raises(ValueError, match="futility stop"):  # two stopping rules are two settings
        certificate_eval_results([futile_labelled, labelled[0]], "toy")
    with pytest.raises(ValueError, match="`futility=True`.*give a `target_radius`"):
        hfs.certify_answer(model, inputs, CANDIDATES, sigma=0.02, n0=2, n=2, futility=True)
    with pytest.raises(ValueError, match="`futility` must be True or False, got 'yes'"):
        hfs.certify_answer(model, inputs, CANDIDATES, sigma=0.02, n0=2, n=64, target_radius=0.01, futility="yes")
    with pytest.raises(ValueError, match="`futility=True`.*give a `target_radius`"):
        certify_prediction(model, inputs["pixel_values"], torch.randn(3, 8), sigma=0.02, n0=2, n=2, futility=True,
                           input_space="processed")
    boosted = hfs.add_booster(tiny_smoothed_model("llava", num_samples=1, seed=0), hfs.GSBConfig(sigmas=[0.25]))
    record = hfs.certify_answer(boosted, tiny_inputs(boosted), CANDIDATES, n0=4, n=4, seed=1).to_dict()
    assert record["booster"] == "default" and len(record["booster_digest"]) == 16 and record["sigma"] == 0.25
    assert record["base_classifier"].endswith("on one noisy copy x + δ, the booster conditioned on σ")
    with boosted.disable_adapter():  # held but not run: the certificate must not claim it
        off = hfs.certify_answer(boosted, tiny_inputs(boosted), CANDIDATES, n0=4, n=4, seed=1).to_dict()
    assert off["booster"] is None and off["booster_digest"] is None and "booster" not in off["base_classifier"]


def _linear_output_dtypes(model) -> tuple[set, list]:
    dtypes: set = set()
    handles = [m.register_forward_hook(lambda _, __, out: dtypes.add(out.dtype))
               for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return dtypes, handles


def test_certify_answer_runs_in_the_autocast_dtype_it_records(models):
    """`autocast_dtype` (or a smoothed model's own) puts the model's matmuls in bf16 and the certificate says so;
    float32 stays float32, also on a model whose own autocast is bf16. The certificate is about the model as computed in the recorded dtype."""
    stock, smoothed_bf16 = models["stock"], tiny_smoothed_model("llava", num_samples=1, seed=0,
                                                                autocast_dtype="bfloat16")
    for model, autocast_dtype, expected in ((stock, None, torch.float32), (stock, "bfloat16", torch.bfloat16),
                                            (smoothed_bf16, None, torch.bfloat16),
                                            (smoothed_bf16, "float32", torch.float32)):  # its own autocast off
        dtypes, handles = _linear_output_dtypes(model)
        try:
            record = hfs.certify_answer(model, tiny_inputs(model), CANDIDATES, sigma=0.25, n0=4, n=4, seed=0,
                                        autocast_dtype=autocast_dtype).to_dict()
        finally:
            for handle in handles:
                handle.remove()
        assert dtypes == {expected} and record["dtype"] == str(expected).removeprefix("torch.")
    with pytest.raises(ValueError, match="autocast_dtype"):
        hfs.certify_answer(stock, tiny_inputs(stock), CANDIDATES, sigma=0.25, n0=4, n=4, autocast_dtype="int8")
    half = tiny_model("llava").to(torch.bfloat16)  # float32 passes are impossible: refused, never recorded
    with pytest.raises(ValueError, match="autocast_dtype='float32'.*bfloat16 weights"):
        hfs.certify_answer(half, tiny_inputs(half), CANDIDATES, sigma=0.25, n0=4, n=4, autocast_dtype="float32")
    with pytest.raises(ValueError, match="autocast_dtype='float32'.*bfloat16 weights"):
        hfs.certify(half, tiny_inputs(half)["pixel_values"], sigma=0.25, n0=4, n=4, autocast_dtype="float32")


@pytest.mark.parametrize("change, error, match", [
    ({"candidates": ["answer 0", "answer 1"]}, TypeError, "candidates"),
    ({"candidates": CandidateAnswers(((20, 5000), (20, 5001)), ("a", "b"))}, ValueError, "candidates"),
    ({"n0": 0}, ValueError, "n0"),
    ({"n": -3}, ValueError, "`n`"),
    ({"alpha": 1.5}, ValueError, "alpha"),
    ({"sigma": -0.1}, ValueError, "sigma"),
    ({"sigma": None}, ValueError, "sigma"),
    ({"batch_size": 0}, ValueError, "batch_size"),
    ({"target_radius": -1.0}, ValueError, "target_radius"),
    ({"images": 2}, ValueError, "pixel_values"),
    ({"prompts": 2}, ValueError, "inputs"),
    ({"scale": 3.0}, ValueError, r"`pixel_values` map back to pixel intensities .* outside \[0, 1\]"),
])
def test_certify_answer_refuses_bad_arguments(models, change, error, match):
    model = models["stock"]
    inputs = tiny_inputs(model)
    if "scale" in change:  # not this model's processed pixels: σ there would not be σ in [0, 1] pixel units
        inputs = dict(inputs, pixel_values=inputs["pixel_values"] * change["scale"])
    if "images" in change:
        inputs = dict(inputs, pixel_values=tiny_inputs(model, num_images=2)["pixel_values"])
    if "prompts" in change:
        inputs = tiny_inputs(model, num_images=2)
    arguments = dict(candidates=CANDIDATES, sigma=0.25, n0=4, n=4, seed=0)
    arguments.update({k: v for k, v in change.items() if k not in ("images", "prompts", "scale")})
    with pytest.raises(error, match=match):
        hfs.certify_answer(model, inputs, **arguments)


def test_the_target_a_vote_stops_at_proves_its_radius_in_exact_arithmetic():
    """A stop rejects p_A ≤ t̂ (a float); claiming radius R exactly needs t̂ ≥ Φ(R/σ) exactly, not only in float
    (Φ(R/σ) rounded to the nearest float is below it about half the time)."""
    import mpmath

    from hf_feature_smoothing.statistics.vote import vote_target

    generator = torch.Generator().manual_seed(0)
    for sigma, radius in (torch.rand(500, 2, generator=generator, dtype=torch.float64) * torch.tensor([1.0, 2.0])
                          + torch.tensor([0.05, 1e-17])).tolist():
        if radius / sigma < 3.5:
            assert mpmath.mpf(vote_target(radius, sigma)) >= mpmath.ncdf(mpmath.mpf(radius) / mpmath.mpf(sigma))


@pytest.mark.parametrize("sigma, target_radius", [(0.25, 0.3), (0.5, 0.5), (0.12, 0.1)])
def test_a_certificate_stopped_at_its_target_is_counted_at_that_radius(sigma, target_radius):
    """Stopped because p̲_A ≥ Φ(R/σ), the certificate states radius ≥ R exactly (not σΦ⁻¹(Φ(R/σ)) rounded below it)
    and certified accuracy at r = R counts it (radius ≥ r, Cohen et al.'s convention)."""
    from hf_feature_smoothing.statistics import certified_accuracy, certify_vote

    result = certify_vote(torch.tensor([0, 16]), torch.ones(2000), sigma, 0.001, target_radius=target_radius)
    assert result.stop == "target" and result.n_used < 2000 and result.radius >= target_radius
    assert certified_accuracy([result.prediction], [1], [result.radius], [target_radius]) == {
        f"certified_accuracy@{target_radius:g}": 1.0, "abstain_rate": 0.0}
