import json
import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from hf_feature_smoothing import FeatureSmoothingConfig, SmoothedVisionTower
from hf_feature_smoothing.attacks import feature_attack, pgd_feature_attack
from hf_feature_smoothing.certification import as_smoothed_tower, certify, certify_prediction
from hf_feature_smoothing.certification.certificates import FeatureCertificate
from hf_feature_smoothing.smoothing.modeling_smoothed_tower import NoisyCopies
from hf_feature_smoothing.smoothing.noise import SeededNoise, image_fingerprint
from hf_feature_smoothing.statistics.bounds import fcsb, normal_ppf
from hf_feature_smoothing.testing_utils import tiny_inputs, tiny_model

from .toy_encoders import ToyEncoder, toy_image, toy_images


# ----- soundness on encoders with closed-form S --------------------------------------------------------------------
@pytest.mark.parametrize("kind, alpha", [("sign", 0.05), ("sign", 0.2), ("angle", 0.2)])
def test_betting_certificate_covers_the_closed_form_truth(kind, alpha):
    """The whole pipeline (noise in pixel space, features, scores, betting bound) on encoders with known S: the lower
    bound is above the truth in ≤ α of 2000 independent certifications (distinct images: noise is a function of the
    seed and the image). α = 0.2 makes miscalibration visible."""
    sigma, trials = 0.25, 2000
    encoder = ToyEncoder(kind)
    tower = SmoothedVisionTower(encoder, FeatureSmoothingConfig(sigma=sigma, chunk_size=4096))
    starts = [0.3 + 1e-5 * i for i in range(trials)]
    certificates = certify(tower, toy_images(starts), epsilon=0.1, n=100, alpha=alpha, reference="clean", seed=0)
    truths = [encoder.true_score(x, sigma) for x in starts]
    misses = sum(c.score_lower > t for c, t in zip(certificates, truths))
    assert misses / trials <= alpha
    errors = torch.tensor([c.score - t for c, t in zip(certificates, truths)])
    assert errors.mean().item() == pytest.approx(0.0, abs=0.01)  # the estimator is unbiased


@pytest.mark.parametrize("bound", ["bernstein", "hoeffding"])
def test_fixed_n_bounds_cover_the_closed_form_truth(bound):
    sigma, alpha, trials = 0.5, 0.05, 1000
    encoder = ToyEncoder("sign")
    tower = SmoothedVisionTower(encoder, FeatureSmoothingConfig(sigma=sigma, chunk_size=4096))
    starts = [0.3 + 1e-5 * i for i in range(trials)]
    certificates = certify(tower, toy_images(starts), epsilon=0.1, n=300, alpha=alpha, bound=bound,
                           reference="clean", seed=0)
    covered = sum(c.score_lower <= encoder.true_score(x, sigma) for c, x in zip(certificates, starts))
    assert covered / trials >= 1 - alpha


def test_fcsb_is_tight_on_the_sign_encoder():
    """f = u if z₁ < a else −u: shifting x by ε along e₁ gives ⟨f̂(x'), u⟩ = FCSB(ε) with the true S."""
    encoder, sigma, x1 = ToyEncoder("sign", threshold=0.0), 0.5, -0.4
    tower = SmoothedVisionTower(encoder, FeatureSmoothingConfig(sigma=sigma, chunk_size=200_000, seed=1))
    truth = encoder.true_score(x1, sigma)
    for epsilon in [0.1, 0.3]:
        smoothed = tower(toy_image(x1 + epsilon), num_samples=200_000)[0]
        inner = (smoothed @ encoder.u).item()
        assert inner == pytest.approx(fcsb(truth, epsilon, sigma), abs=0.01)


def _smoothed_reference(tower, inputs, seed: int, n0: int) -> torch.Tensor:
    """The reference direction `certify(reference="smoothed", seed=seed, n0=n0)` uses: the normalised mean of the
    image's n0 selection samples."""
    source = SeededNoise(seed, image_fingerprint(tower.family.to_image(inputs)), "selection")
    (features,) = tower.unit_features_batch([NoisyCopies(inputs, n0, source)])
    return torch.nn.functional.normalize(features[-1].double().sum(0), dim=0).float()


@pytest.mark.parametrize("family, algorithm, norm, reference", [
    ("llava", "pgd", "l2", "clean"), ("llava", "apgd", "l2", "smoothed"), ("qwen2_vl", "apgd", "l2", "smoothed"),
    ("qwen2_vl", "apgd", "linf", "clean")])
def test_attack_never_beats_the_certificate_on_tiny_towers(family, algorithm, norm, reference):
    model = tiny_model(family)
    tower = SmoothedVisionTower(model, FeatureSmoothingConfig(sigma=0.25, chunk_size=64, seed=0))
    inputs = tiny_inputs(model, num_images=1)
    epsilons = [0.05, 0.12, 0.25]
    (certificate,) = certify(tower, inputs["pixel_values"], epsilon=epsilons, n=500, alpha=0.01, seed=7,
                             image_grid_thw=inputs.get("image_grid_thw"), reference=reference)
    assert not certificate.abstain and certificate.fcsb[0] is not None
    image_inputs = tower.family.split(tower.check_inputs(inputs["pixel_values"], inputs.get("image_grid_thw")))[0]
    v = (tower.clean_unit_features(image_inputs)[-1] if reference == "clean"
         else _smoothed_reference(tower, image_inputs, 7, certificate.n0))
    for epsilon, bound in zip(epsilons, certificate.fcsb):
        if bound is None:
            continue
        # an ℓ∞ ball of radius ε/√d lies inside the ℓ2 ball of radius ε: the ℓ2 certificate covers it
        budget = epsilon if norm == "l2" else epsilon / math.sqrt(tower.family.to_image(image_inputs).numel())
        attack = feature_attack(tower, image_inputs, v, budget, norm=norm, algorithm=algorithm, steps=10,
                                eot_samples=8, eval_samples=512, generator=torch.Generator().manual_seed(0))
        assert attack.norm <= budget + 1e-5
        assert attack.cosine >= bound, (epsilon, attack.cosine, bound)


def test_certify_on_a_smoothed_mllm_uses_its_sigma_and_reports_everything():
    from hf_feature_smoothing.testing_utils import tiny_smoothed_model

    model = tiny_smoothed_model("qwen3_vl", sigma=0.12)
    inputs = tiny_inputs(model, num_images=2)
    certificates = certify(model, inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"], n=64, n0=16)
    assert len(certificates) == 2
    record = certificates[0].to_dict()
    for key in ("sigma", "epsilon", "n", "n0", "n_used", "alpha", "noise_space", "score_lower", "fcsb", "radius",
                "blank_cosine", "bound", "reference", "seed", "dtype", "versions"):
        assert key in record
    assert record["sigma"] == 0.12 and record["noise_space"].startswith("pixel [0,1]") and record["n0"] == 16
    assert record["bound"] == "betting" and record["reference"] == "smoothed" and record["n_used"] == 64


def test_vacuous_bounds_abstain():
    encoder = ToyEncoder("sign")
    (certificate,) = certify(encoder, toy_image(0.5), sigma=0.5, n=200, epsilon=[0.0, 0.1])  # on the boundary: S = 1/2
    assert certificate.abstain and certificate.fcsb == [None, None] and certificate.radius == [0.0, 0.0]


# ----- prediction certificates ---------------------------------------------------------------------------------------
def test_prediction_certificate_holds_under_attack():
    """A cosine classifier over 3 prototypes: inside the certified radius the attacked smoothed prediction keeps its
    class (attacking the margin to the runner-up)."""
    model = tiny_model("llava")
    tower = SmoothedVisionTower(model, FeatureSmoothingConfig(sigma=0.25, chunk_size=64, seed=0))
    inputs = tiny_inputs(model, num_images=1)
    image_inputs = tower.family.split(tower.check_inputs(inputs["pixel_values"]))[0]
    clean = tower.clean_unit_features(image_inputs)[-1]
    generator = torch.Generator().manual_seed(0)
    others = torch.nn.functional.normalize(torch.randn(2, clean.numel(), generator=generator), dim=1)
    prototypes = torch.cat([clean[None] + 0.3 * others[:1], others])
    (certificate,) = certify_prediction(tower, inputs["pixel_values"], prototypes, labels=[0], n=500, n0=64,
                                        alpha=0.01, method="margin")
    assert certificate.prediction == 0 and certificate.radius > 0 and certificate.correct
    runner_up = int(torch.argmax(prototypes[1:] @ clean)) + 1
    direction = torch.nn.functional.normalize(prototypes[runner_up] - prototypes[0], dim=0)
    # minimising cos to (t_y − t_runner_up) pushes the smoothed feature towards the runner-up
    attack = pgd_feature_attack(tower, image_inputs, -direction, 0.95 * certificate.radius, steps=10,
                                eot_samples=8, eval_samples=512, generator=generator)
    x = image_inputs.with_pixels(tower.family.from_image(tower.family.to_image(image_inputs) + attack.delta,
                                                           image_inputs))
    smoothed = tower(x.pixel_values, num_samples=512)[0]
    scores = torch.nn.functional.normalize(prototypes, dim=1) @ smoothed
    assert int(scores.argmax()) == 0


def _true_prediction_radius(p: torch.Tensor, y: int, sigma: float) -> float:
    others = torch.cat([p[:y], p[y + 1 :]])
    return max(0.0, sigma / 2 * (normal_ppf(p[y].item()) - normal_ppf(others.max().item())))


def test_prediction_certificates_with_1000_prototypes_are_sound_and_keep_their_radius():
    """K = 1000 prototypes t_k = (cos θ_k, sin θ_k) around the angle encoder, where p_k is known in closed form (the
    class, three close competitors, 996 others further away): the certified radius exceeds the true Lipschitz radius
    in ≤ α of 200 images (α = 0.2), and the runner-up split keeps far more of it than the flat α/K split."""
    sigma, alpha, trials = 0.25, 0.2, 200
    encoder = ToyEncoder("angle")
    tower = SmoothedVisionTower(encoder, FeatureSmoothingConfig(sigma=sigma, chunk_size=4096))
    offsets = torch.cat([torch.tensor([0.0, 0.8, -0.8, 1.0]), torch.linspace(1.5, 2 * math.pi - 1.5, 996)])
    angles = 0.4 + offsets
    prototypes = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    starts = [0.4 + 1e-5 * i for i in range(trials)]
    certificates = certify_prediction(tower, toy_images(starts), prototypes, labels=[0] * trials, n=200, n0=32,
                                      alpha=alpha, seed=0, method="margin")
    truths = [_true_prediction_radius(encoder.true_prototype_scores(x, sigma, angles), 0, sigma) for x in starts]
    assert all(c.prediction == 0 for c in certificates)
    assert sum(c.radius > t for c, t in zip(certificates, truths)) / trials <= alpha
    assert all({1, 2, 3} <= set(c.runner_ups) for c in certificates)  # the close competitors were picked
    flat = certify_prediction(tower, toy_images(starts[:50]), prototypes, n=200, n0=32, alpha=alpha, seed=0,
                              alpha_split="flat", method="margin")
    runner_up = sum(c.radius for c in certificates[:50]) / 50
    assert runner_up > 1.3 * sum(c.radius for c in flat) / 50
    assert runner_up > 0.6 * sum(truths[:50]) / 50


# ----- reproducibility, batching, memory --------------------------------------------------------------------------
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


class _CountingCalls:
    """Counts tower calls and the images in each."""

    def __init__(self, module: torch.nn.Module):
        self.sizes: list[int] = []
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        pixel_values = args[0] if args else kwargs.get("pixel_values", kwargs.get("hidden_states"))
        self.sizes.append(pixel_values.shape[0])


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_several_images_per_tower_call_give_bit_identical_certificates(family):
    """B images × k copies share each tower call, yet every image's certificate (fixed n or sequential) is bit-identical
    to certifying it alone."""
    model = tiny_model(family)
    inputs = tiny_inputs(model, num_images=3)
    grid = inputs.get("image_grid_thw")
    tower = SmoothedVisionTower(model, FeatureSmoothingConfig(sigma=0.25, chunk_size=48))
    calls = _CountingCalls(tower.family.tower())
    for kwargs in (dict(n=30, n0=10), dict(n=200, n0=10, target_cosine=0.05, epsilon=0.0)):
        together = certify(tower, inputs["pixel_values"], image_grid_thw=grid, seed=5, **kwargs)
        for i, certificate in enumerate(together):
            single = tower.family.split(tower.check_inputs(inputs["pixel_values"], grid))[i]
            (alone,) = certify(tower, single, seed=5, **kwargs)
            assert (alone.score, alone.score_lower, alone.n_used, alone.stop) == (
                certificate.score, certificate.score_lower, certificate.n_used, certificate.stop)
    assert together[0].stop == "target" and together[0].n_used < 200
    patches = 16 if family != "llava" else 1  # Qwen: rows of patches per image
    assert max(calls.sizes) // patches > 10  # several images' copies per call (3 × 10 selection copies at once)


def _peak_tensor_bytes(fn) -> int:
    """Peak bytes of live CPU tensors allocated while `fn` runs (PyTorch profiler allocation events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def test_certify_memory_does_not_grow_with_n():
    """Peak tensor memory at n = 16384 stays within a small constant of n = 256 (kept: the n scalar scores, 8 bytes
    each); keeping the features would cost 4 KiB per sample (1024-wide features)."""
    tower = SmoothedVisionTower(ToyEncoder("sign", width=1024), FeatureSmoothingConfig(sigma=0.25, chunk_size=256))
    peaks = {n: _peak_tensor_bytes(lambda n=n: certify(tower, toy_image(0.3), n=n, n0=64, seed=0))
             for n in (256, 16384)}
    per_extra_sample = (peaks[16384] - peaks[256]) / (16384 - 256)
    assert per_extra_sample < 64, peaks  # vs 4096 bytes per sample for the features
    assert peaks[16384] < 3 * peaks[256], peaks


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_chunk_size_bounds_every_tower_call_even_with_more_images_than_it(family):
    """9 images with `chunk_size=4`: every Monte Carlo tower call holds at most 4 images, and the smoothed features
    equal those of one call per copy (`chunk_size=16`): the same noise, only the tower batches differ."""
    model = tiny_model(family)
    images = {k: v for k, v in tiny_inputs(model, num_images=9).items() if k in ("pixel_values", "image_grid_thw")}
    outputs = {}
    for chunk in (4, 16):
        tower = SmoothedVisionTower(model, FeatureSmoothingConfig(sigma=0.25, num_samples=3, chunk_size=chunk, seed=0))
        sizes = []
        hook = tower.family.tower().register_forward_pre_hook(
            lambda module, args, kwargs: sizes.append(tower.family.inputs_from_call(args, kwargs).num_images),
            with_kwargs=True)
        with torch.no_grad():
            outputs[chunk] = torch.stack(tower(**images))
        hook.remove()
        assert max(sizes) <= chunk and sum(sizes) == 9 * 3, (chunk, sizes)
    torch.testing.assert_close(outputs[4], outputs[16], rtol=1e-5, atol=1e-6)


def test_prediction_memory_does_not_grow_with_n_times_k():
    tower = SmoothedVisionTower(ToyEncoder("angle"), FeatureSmoothingConfig(sigma=0.25, chunk_size=256))
    prototypes = torch.randn(1000, 2)
    peaks = {n: _peak_tensor_bytes(lambda n=n: certify_prediction(tower, toy_image(0.3), prototypes, n=n, n0=32,
                                                                  seed=0, method="margin")) for n in (256, 4096)}
    assert (peaks[4096] - peaks[256]) / (4096 - 256) < 200, peaks  # the kept scores of y and 4 runner-ups (5 × 8 B)


# ----- records ---------------------------------------------------------------------------------------------------------
def test_certificates_are_strict_json():
    certificate = FeatureCertificate(index=0, score=math.nan, score_lower=-math.inf, abstain=True, epsilon=[0.1],
                                     fcsb=[None], tau=[0.5], radius=[math.inf], sigma=0.25, n0=0, n=10, alpha=0.01,
                                     bound="betting", reference="clean")
    record = certificate.to_dict()
    text = json.dumps(record, allow_nan=False)  # raises on NaN / inf
    assert record["score"] is None and record["score_lower"] is None and record["radius"] == [None]
    assert json.loads(text)["epsilon"] == [0.1]


def test_reference_levels_are_recorded():
    model = tiny_model("llava")
    inputs = tiny_inputs(model, num_images=3)["pixel_values"]
    certificates = certify(model, inputs[:1], sigma=0.25, n=32, n0=8, seed=0, unrelated_images=inputs[1:])
    (c,) = certificates
    assert -1 <= c.blank_cosine <= 1 and -1 <= c.unrelated_cosine <= 1
    tower = as_smoothed_tower(model, 0.25)
    v = _smoothed_reference(tower, tower.family.split(tower.check_inputs(inputs[:1]))[0], 0, 8)
    others = [tower.clean_unit_features(x)[-1].detach() for x in tower.family.split(tower.check_inputs(inputs[1:]))]
    assert c.unrelated_cosine == pytest.approx(max(float(o @ v) for o in others), abs=1e-5)
    assert certify(model, inputs[:1], sigma=0.25, n=8, n0=8, seed=0)[0].unrelated_cosine is None


def test_bfloat16_autocast_is_recorded_and_warns_on_cpus_without_support(monkeypatch, caplog):
    model = tiny_model("llava")
    inputs = tiny_inputs(model)["pixel_values"]
    (certificate,) = certify(model, inputs, sigma=0.25, n=16, n0=8, autocast_dtype="bfloat16", seed=0)
    assert certificate.dtype == "bfloat16" and not certificate.abstain
    (float32,) = certify(model, inputs, sigma=0.25, n=16, n0=8, seed=0)
    assert float32.dtype == "float32" and float32.score != certificate.score  # computed in another dtype
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    from hf_feature_smoothing.utils.logging import get_logger

    logger = get_logger("hf_feature_smoothing.certification.certify")
    logger.propagate = True
    with caplog.at_level("WARNING", logger=logger.name):
        certify(model, inputs, sigma=0.25, n=4, n0=4, autocast_dtype="bfloat16", seed=0)
    assert "emulated" in caplog.text and "autocast_dtype" in caplog.text
    with pytest.raises(ValueError, match="autocast_dtype"):
        certify(model, inputs, sigma=0.25, n=4, autocast_dtype="int8")
