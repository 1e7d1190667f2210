"""Every public entry point meets bad input with a clear error naming the argument (no silent garbage)."""

import math

import pytest
import torch

import hf_feature_smoothing as hfs
from hf_feature_smoothing.attacks import feature_attack
from hf_feature_smoothing.attacks.text import target_text_attack
from hf_feature_smoothing.certification import certify, certify_prediction
from hf_feature_smoothing.statistics.aggregates import certified_accuracy, certified_cosine
from hf_feature_smoothing.statistics.bounds import fcsb, lower_confidence_bound
from hf_feature_smoothing.testing_utils import tiny_inputs, tiny_model


BAD_SIGMAS = [0, -0.1, math.nan, math.inf, "0.25", True]
BAD_ALPHAS = [0, 1, -0.5, 1.5, math.nan, True]


def _bad_images(good: torch.Tensor) -> list[tuple[object, str]]:
    nan, inf = good.clone(), good.clone()
    nan.view(-1)[0], inf.view(-1)[-1] = math.nan, math.inf
    return [
        (nan, "NaN or inf"), (inf, "NaN or inf"), ((good * 255).to(torch.uint8), "floating"),
        (good[:0], "empty"), (good[0], "dims"), (good[None], "dims"), (good.numpy(), "torch.Tensor"),
    ]


@pytest.fixture(scope="module")
def llava():
    model = tiny_model("llava")
    return model, hfs.SmoothedVisionTower(model, hfs.FeatureSmoothingConfig(seed=0)), tiny_inputs(model)


@pytest.mark.parametrize("sigma", BAD_SIGMAS)
def test_bad_sigma_everywhere(sigma, llava):
    model, tower, inputs = llava
    for call in (lambda: hfs.FeatureSmoothingConfig(sigma=sigma), lambda: certify(model, inputs["pixel_values"], sigma=sigma, n=4),
                 lambda: hfs.GSBConfig(sigmas=[sigma])):
        with pytest.raises((ValueError, TypeError), match="sigma"):
            call()


@pytest.mark.parametrize("alpha", BAD_ALPHAS)
def test_bad_alpha_everywhere(alpha, llava):
    model, tower, inputs = llava
    prototypes = torch.randn(2, 64 * 4)
    for call in (lambda: certify(tower, inputs["pixel_values"], alpha=alpha, n=4),
                 lambda: certify_prediction(tower, inputs["pixel_values"], prototypes, alpha=alpha, n=4),
                 lambda: lower_confidence_bound(torch.rand(10), alpha)):
        with pytest.raises(ValueError, match="alpha"):
            call()


def test_bad_images_everywhere(llava):
    model, tower, inputs = llava
    good = inputs["pixel_values"]
    for bad, match in _bad_images(good):
        entry_points = [lambda b=bad: tower(b), lambda b=bad: certify(tower, b, n=4),
                        lambda b=bad: certify_prediction(tower, b, torch.randn(2, 256), n=4)]
        if torch.is_tensor(bad) and bad.ndim == good.ndim:  # attacks take processed inputs of the right rank
            entry_points.append(lambda b=bad: feature_attack(tower, hfs.ImageInputs(b), torch.ones(4), 0.1, steps=1))
            entry_points.append(lambda b=bad: target_text_attack(model, {**inputs, "pixel_values": b},
                                                                  torch.tensor([3]), 0.1, steps=1))
        for call in entry_points:
            with pytest.raises((ValueError, TypeError), match=match):
                call()


@pytest.mark.parametrize("kwargs, match", [
    (dict(epsilon=-0.1), "epsilon"), (dict(epsilon=math.nan), "epsilon"), (dict(norm="l1"), "norm"),
    (dict(algorithm="fgsm"), "algorithm"), (dict(steps=0), "steps"), (dict(eot_samples=-1), "eot_samples"),
    (dict(restarts=0), "restarts"),
])
def test_bad_attack_arguments(kwargs, match, llava):
    _, tower, inputs = llava
    image = tower.check_inputs(inputs["pixel_values"])
    reference = tower.clean_unit_features(image)[-1]
    arguments = {"epsilon": 0.1, **kwargs}
    with pytest.raises(ValueError, match=match):
        feature_attack(tower, image, reference, arguments.pop("epsilon"), **arguments)


def test_bad_text_attack_inputs(llava):
    model, _, inputs = llava
    with pytest.raises(ValueError, match="target_ids"):
        target_text_attack(model, inputs, torch.tensor([], dtype=torch.long), 0.1)
    with pytest.raises(ValueError, match="input_ids"):
        target_text_attack(model, {"pixel_values": inputs["pixel_values"]}, torch.tensor([3]), 0.1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_samples=0), "num_samples"), (dict(chunk_size=-2), "chunk_size"), (dict(autocast_dtype="int8"), "autocast"),
    (dict(smoothed_features="tokens"), "smoothed_features"), (dict(image_mean=[0.5, 0.5]), "image_mean"),
    (dict(seed=1.5), "seed"),
])
def test_bad_smoothing_config(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        hfs.FeatureSmoothingConfig(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(position="inside"), "position"), (dict(hidden_dim=0), "hidden_dim"), (dict(feature_dim=-1), "feature_dim"),
    (dict(sigmas=[]), "sigmas"),
])
def test_bad_booster_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hfs.GSBConfig(**kwargs)


def test_bad_summaries_and_bounds():
    with pytest.raises(ValueError, match="at least one"):
        certified_cosine([], [], [0.1])
    with pytest.raises(ValueError, match="score_lower"):
        certified_cosine([1.5], [0.25], [0.1])
    with pytest.raises(ValueError, match="epsilons"):
        certified_cosine([0.9], [0.25], [-1])
    with pytest.raises(ValueError, match="radii"):
        certified_accuracy([1], [1], [0.2], [-0.1])
    with pytest.raises(ValueError):
        fcsb(0.9, 0.1, 0.0)


def test_unsupported_models_are_named():
    with pytest.raises(ValueError, match="Unsupported vision tower.*Supported model types"):
        hfs.SmoothedVisionTower(tiny_model("llava").model.language_model)
    with pytest.raises(ValueError, match="Unsupported vision tower"):
        hfs.add_booster(tiny_model("llava").model.language_model)
