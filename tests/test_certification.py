import math

import pytest
import torch

from hf_feature_smoothing import FeatureSmoothingConfig, SmoothedVisionTower
from hf_feature_smoothing.attacks import feature_attack, pgd_feature_attack
from hf_feature_smoothing.certification import as_smoothed_tower, certify, certify_prediction
from hf_feature_smoothing.certification.bounds import fcsb
from hf_feature_smoothing.testing_utils import tiny_inputs, tiny_model

from .toy_encoders import ToyEncoder, toy_image


@pytest.mark.parametrize("kind, x1, bound", [("angle", 0.3, "bernstein"), ("sign", -0.2, "bernstein"),
                                             ("sign", -0.2, "hoeffding")])
def test_certified_score_covers_the_closed_form_truth(kind, x1, bound):
    """The whole pipeline (noise in pixel space, features, scores, bound) on encoders with known S: the lower bound
    is below the truth in ≥ 1 − α of 1000 independent certifications."""
    sigma, alpha, trials = 0.5, 0.05, 1000
    encoder = ToyEncoder(kind)
    tower = SmoothedVisionTower(encoder, FeatureSmoothingConfig(sigma=sigma, chunk_size=4096, seed=0))
    # distinct images (noise is a function of the image and the seed): x₁ moves by 1e-5 per trial
    starts = [x1 + 1e-5 * i for i in range(trials)]
    truths = torch.tensor([encoder.true_score(x, sigma) for x in starts])
    certificates = certify(tower, torch.cat([toy_image(x) for x in starts]), epsilon=0.1, n=300, alpha=alpha,
                           bound=bound)
    covered = sum(c.score_lower <= t for c, t in zip(certificates, truths.tolist()))
    assert covered / trials >= 1 - alpha
    errors = torch.tensor([c.score for c in certificates]) - truths
    assert errors.mean().item() == pytest.approx(0.0, abs=0.01)  # the estimator is unbiased


def test_fcsb_is_tight_on_the_sign_encoder():
    """f = u if z₁ < a else −u: shifting x by ε along e₁ gives ⟨f̂(x'), u⟩ = FCSB(ε) with the true S."""
    encoder, sigma, x1 = ToyEncoder("sign", threshold=0.0), 0.5, -0.4
    tower = SmoothedVisionTower(encoder, FeatureSmoothingConfig(sigma=sigma, chunk_size=200_000, seed=1))
    truth = encoder.true_score(x1, sigma)
    for epsilon in [0.1, 0.3]:
        smoothed = tower(toy_image(x1 + epsilon), num_samples=200_000)[0]
        inner = (smoothed @ encoder.u).item()
        assert inner == pytest.approx(fcsb(truth, epsilon, sigma), abs=0.01)


@pytest.mark.parametrize("family, algorithm, norm", [("llava", "pgd", "l2"), ("llava", "apgd", "l2"),
                                                     ("qwen2_vl", "apgd", "l2"), ("qwen2_vl", "apgd", "linf")])
def test_attack_never_beats_the_certificate_on_tiny_towers(family, algorithm, norm):
    model = tiny_model(family)
    tower = SmoothedVisionTower(model, FeatureSmoothingConfig(sigma=0.25, chunk_size=64, seed=0))
    inputs = tiny_inputs(model, num_images=1)
    epsilons = [0.05, 0.12, 0.25]
    (certificate,) = certify(tower, inputs["pixel_values"], epsilon=epsilons, n=500, alpha=0.01,
                             image_grid_thw=inputs.get("image_grid_thw"))
    assert not certificate.abstain and certificate.fcsb[0] is not None
    image_inputs = tower.adapter.split(tower.check_inputs(inputs["pixel_values"], inputs.get("image_grid_thw")))[0]
    reference = tower.clean_unit_features(image_inputs)[-1]
    for epsilon, bound in zip(epsilons, certificate.fcsb):
        if bound is None:
            continue
        # an ℓ∞ ball of radius ε/√d lies inside the ℓ2 ball of radius ε: the ℓ2 certificate covers it
        budget = epsilon if norm == "l2" else epsilon / math.sqrt(tower.adapter.to_image(image_inputs).numel())
        attack = feature_attack(tower, image_inputs, reference, budget, norm=norm, algorithm=algorithm, steps=10,
                                eot_samples=8, eval_samples=512, generator=torch.Generator().manual_seed(0))
        assert attack.norm <= budget + 1e-5
        assert attack.cosine >= bound, (epsilon, attack.cosine, bound)


def test_certify_on_a_smoothed_mllm_uses_its_sigma_and_reports_everything():
    from hf_feature_smoothing.testing_utils import tiny_smoothed_model

    model = tiny_smoothed_model("qwen3_vl", sigma=0.12)
    inputs = tiny_inputs(model, num_images=2)
    certificates = certify(model, inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"], n=64, n0=16,
                           reference="smoothed")
    assert len(certificates) == 2
    record = certificates[0].to_dict()
    for key in ("sigma", "epsilon", "n", "n0", "alpha", "noise_space", "score_lower", "fcsb", "radius"):
        assert key in record
    assert record["sigma"] == 0.12 and record["noise_space"].startswith("pixel [0,1]") and record["n0"] == 16


def test_vacuous_bounds_abstain():
    encoder = ToyEncoder("sign", threshold=0.0)
    (certificate,) = certify(encoder, toy_image(0.0), sigma=0.5, n=200, epsilon=[0.0, 0.1])  # on the boundary: S = 1/2
    assert certificate.abstain and certificate.fcsb == [None, None] and certificate.radius == [0.0, 0.0]


def test_prediction_certificate_holds_under_attack():
    """A cosine classifier over 3 prototypes: inside the certified radius the attacked smoothed prediction keeps its
    class (attacking the margin to the runner-up)."""
    model = tiny_model("llava")
    tower = SmoothedVisionTower(model, FeatureSmoothingConfig(sigma=0.25, chunk_size=64, seed=0))
    inputs = tiny_inputs(model, num_images=1)
    image_inputs = tower.adapter.split(tower.check_inputs(inputs["pixel_values"]))[0]
    clean = tower.clean_unit_features(image_inputs)[-1]
    generator = torch.Generator().manual_seed(0)
    others = torch.nn.functional.normalize(torch.randn(2, clean.numel(), generator=generator), dim=1)
    prototypes = torch.cat([clean[None] + 0.3 * others[:1], others])
    (certificate,) = certify_prediction(tower, inputs["pixel_values"], prototypes, labels=[0], n=500, n0=64,
                                        alpha=0.01)
    assert certificate.prediction == 0 and certificate.radius > 0 and certificate.correct
    runner_up = int(torch.argmax(prototypes[1:] @ clean)) + 1
    direction = torch.nn.functional.normalize(prototypes[runner_up] - prototypes[0], dim=0)
    # minimising cos to (t_y − t_runner_up) pushes the smoothed feature towards the runner-up
    attack = pgd_feature_attack(tower, image_inputs, -direction, 0.95 * certificate.radius, steps=10,
                                eot_samples=8, eval_samples=512, generator=generator)
    x = image_inputs.with_pixels(tower.adapter.from_image(tower.adapter.to_image(image_inputs) + attack.delta,
                                                           image_inputs))
    smoothed = tower(x.pixel_values, num_samples=512)[0]
    scores = torch.nn.functional.normalize(prototypes, dim=1) @ smoothed
    assert int(scores.argmax()) == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(alpha=0.0), "`alpha`"), (dict(alpha=1.5), "`alpha`"), (dict(n=0), "`n`"), (dict(n0=-1), "`n0`"),
     (dict(sigma=-0.1), "`sigma`"), (dict(bound="chernoff"), "`bound`"), (dict(reference="text"), "`reference`"),
     (dict(epsilon=[-0.1]), "`epsilon`")],
)
def test_certify_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        certify(ToyEncoder("angle"), toy_image(0.0), **kwargs)


def test_certify_rejects_bad_images():
    with pytest.raises(ValueError, match="NaN"):
        certify(ToyEncoder("angle"), toy_image(math.nan))
    with pytest.raises(ValueError, match="empty"):
        certify(ToyEncoder("angle"), [])
    tower = as_smoothed_tower(ToyEncoder("angle"), 0.3)
    assert tower.sigma == 0.3


def test_seeded_certificate_depends_only_on_seed_image_and_parameters():
    model = tiny_model("llava")
    inputs = tiny_inputs(model, num_images=3)["pixel_values"]
    small = SmoothedVisionTower(model, FeatureSmoothingConfig(sigma=0.25, chunk_size=7))
    large = SmoothedVisionTower(model, FeatureSmoothingConfig(sigma=0.25, chunk_size=64))
    kwargs = dict(n=40, n0=9, reference="smoothed", seed=123)
    batch = certify(small, inputs, **kwargs)
    alone = certify(large, inputs[2:3], **kwargs)[0]  # other position, other chunking, after earlier calls
    assert alone.score == batch[2].score and alone.score_lower == batch[2].score_lower
    assert certify(small, inputs[2:3], **{**kwargs, "seed": 124})[0].score != alone.score
    fresh = certify(small, inputs[:1], n=40)[0]
    assert fresh.seed is not None and certify(small, inputs[:1], n=40, seed=fresh.seed)[0].score == fresh.score
    assert certify(small, inputs[:1], n=40)[0].seed != fresh.seed  # unseeded calls never repeat their noise
    record = alone.to_dict()
    assert record["resolution"] == [56, 56] and record["dtype"] == "float32"
    assert {"hf_feature_smoothing", "transformers", "torch"} <= set(record["versions"])
