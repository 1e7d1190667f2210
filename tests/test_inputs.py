"""What `certify`, `certify_prediction` and `feature_attack` accept, and what they refuse before drawing a sample."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from transformers import BatchFeature

from hf_feature_smoothing import FeatureSmoothingConfig, SmoothedVisionTower
from hf_feature_smoothing.attacks import AttackResult, feature_attack
from hf_feature_smoothing.certification import as_smoothed_tower, certify, certify_prediction, to_image_inputs
from hf_feature_smoothing.testing_utils import tiny_inputs, tiny_model

from .toy_encoders import ToyEncoder, toy_image


@pytest.fixture(scope="module")
def llava():
    model = tiny_model("llava")
    tower = SmoothedVisionTower(model, FeatureSmoothingConfig(sigma=0.25, chunk_size=64))
    pixels = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    return model, tower, pixels


class _Calls:
    """Counts forward passes of a module."""

    def __init__(self, module):
        self.count = 0
        module.register_forward_pre_hook(lambda *args: setattr(self, "count", self.count + 1))


# ----- input spaces -------------------------------------------------------------------------------------------------
def test_pixel_tensors_need_input_space_and_then_match_processed_inputs(llava):
    model, tower, pixels = llava
    with pytest.raises(ValueError, match="input_space='pixel'.*input_space='processed'"):
        certify(tower, pixels, n=8, seed=0)  # [0, 1] pixels also read as plausible processed values: ambiguous
    processed = tower.family.from_image(pixels, to_image_inputs(tower, pixels, input_space="pixel")[0])
    from_pixels = certify(tower, pixels, input_space="pixel", n=16, n0=8, seed=0)
    from_processed = certify(tower, processed, n=16, n0=8, seed=0)  # unambiguous: values outside [0, 1]
    assert [c.score_lower for c in from_pixels] == [c.score_lower for c in from_processed]
    pil = [Image.fromarray((p.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()) for p in pixels]
    assert len(certify(tower, pil, n=4, n0=4, seed=0)) == 2 and len(certify(tower, pil[0], n=4, n0=4, seed=0)) == 1


def test_image_processor_outputs_are_processed_inputs(llava):
    """`certify(model, image_processor(images, return_tensors="pt"))`: a BatchFeature (a Mapping, not a dict) with
    `pixel_values` (and Qwen-VL's `image_grid_thw`) is read as processed inputs, the same certificates as its tensors."""
    model, tower, pixels = llava
    processed = tower.family.from_image(pixels, to_image_inputs(tower, pixels, input_space="pixel")[0])
    outputs = BatchFeature({"pixel_values": processed}, tensor_type="pt")
    expected = [c.score_lower for c in certify(tower, processed, n=8, n0=4, seed=0)]
    assert [c.score_lower for c in certify(tower, outputs, n=8, n0=4, seed=0)] == expected
    with pytest.raises(ValueError, match="processor outputs.*input_space='pixel'"):
        certify(tower, outputs, input_space="pixel", n=4)
    with pytest.raises(TypeError, match="return_tensors='pt'"):
        certify(tower, {"pixel_values": processed.tolist()}, n=4)
    qwen = tiny_model("qwen2_vl")
    inputs = tiny_inputs(qwen)
    as_returned = BatchFeature(dict(inputs), tensor_type="pt")
    expected = certify(qwen, inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"], input_space="processed",
                       sigma=0.25, n=8, n0=4, seed=0)
    got = certify(qwen, as_returned, sigma=0.25, n=8, n0=4, seed=0)
    assert [c.score_lower for c in got] == [c.score_lower for c in expected]
    with pytest.raises(ValueError, match="drop `image_grid_thw`"):
        certify(qwen, as_returned, image_grid_thw=inputs["image_grid_thw"], sigma=0.25, n=4)


@pytest.mark.parametrize("space, transform, match", [
    ("pixel", lambda p, t: t.family.from_image(p, to_image_inputs(t, p, input_space="pixel")[0]),
     r"input_space='pixel'.*\[0, 1\] intensities.*input_space='processed'"),
    ("processed", lambda p, t: p * 40 - 20, r"input_space='processed'.*outside.*\[0, 1\]"),
    (None, lambda p, t: p * 40 - 20, "cannot be this model's processed"),
    ("tensor", lambda p, t: p, "input_space"),
])
def test_tensors_in_an_impossible_space_are_refused(llava, space, transform, match):
    _, tower, pixels = llava
    with pytest.raises(ValueError, match=match):
        certify(tower, transform(pixels, tower), input_space=space, n=4)


def test_input_space_contradictions_are_refused(llava):
    model, tower, pixels = llava
    inputs = tiny_inputs(model)
    pil = Image.new("RGB", (60, 60))
    with pytest.raises(ValueError, match="PIL images.*input_space='processed'"):
        certify(tower, [pil], input_space="processed", n=4)
    with pytest.raises(ValueError, match="ImageInputs.*input_space='pixel'"):
        certify(tower, tower.check_inputs(inputs["pixel_values"]), input_space="pixel", n=4)
    with pytest.raises(TypeError, match="`images` must be a torch.Tensor"):
        certify(tower, pixels.numpy(), n=4)
    qwen = tiny_model("qwen2_vl")
    with pytest.raises(ValueError, match="input_space='pixel'.*Qwen-VL"):
        certify(qwen, pixels, input_space="pixel", image_grid_thw=torch.tensor([[1, 4, 4]] * 2), n=4)


def test_identity_normalisation_needs_no_input_space():
    (certificate,) = certify(ToyEncoder("angle"), toy_image(0.3), n=8, n0=4, seed=0)
    assert certificate.n_used == 8
    with pytest.raises(ValueError, match="cannot be this model's processed"):
        certify(ToyEncoder("angle"), toy_image(-0.2), n=8)


# ----- validation before any sample ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(alpha=0.0), "`alpha`"), (dict(alpha=1.5), "`alpha`"), (dict(n=0), "`n`"), (dict(n0=-1), "`n0`"),
    (dict(sigma=-0.1), "`sigma`"), (dict(bound="chernoff"), "`bound`"), (dict(reference="text"), "`reference`"),
    (dict(epsilon=[-0.1]), "`epsilon`.*-0.1"), (dict(epsilon=math.nan), "`epsilon`.*nan"),
    (dict(epsilon=[0.1, math.inf]), "`epsilon`.*inf"), (dict(tau=math.nan), "`tau`.*nan"), (dict(tau=1.0), "`tau`"),
    (dict(tau=[-0.5]), "`tau`"), (dict(seed=-1), "`seed`"), (dict(input_space="rgb"), "`input_space`"),
])
def test_certify_rejects_bad_arguments_before_sampling(kwargs, match):
    encoder = ToyEncoder("angle")
    calls = _Calls(encoder)
    with pytest.raises(ValueError, match=match):
        certify(encoder, toy_image(0.3), **kwargs)
    assert calls.count == 0


@pytest.mark.parametrize("prototypes, labels, match", [
    (torch.tensor([[1.0, 0.0], [math.nan, 1.0]]), None, r"`prototypes` rows \[1\].*NaN"),
    (torch.tensor([[1.0, 0.0], [0.0, 0.0]]), None, r"`prototypes` rows \[1\] are all zero"),
    (torch.tensor([1.0, 0.0]), None, "`prototypes` must be"), ([[1.0, 0.0]], None, "`prototypes` must be"),
    (torch.eye(2), [2], r"`labels`.*\[0, 2\).*2"), (torch.eye(2), [True], "`labels`"),
    (torch.eye(2), [0, 1], "`labels` has 2 entries for 1 images"), (torch.eye(3), None, "`prototypes` have dim 3"),
])
def test_certify_prediction_rejects_bad_prototypes_and_labels_before_sampling(prototypes, labels, match):
    encoder = ToyEncoder("angle")
    tower = as_smoothed_tower(encoder, 0.25)
    calls = _Calls(encoder)
    with pytest.raises((ValueError, TypeError), match=match):
        certify_prediction(tower, toy_image(0.3), prototypes, labels, n=8)
    assert calls.count <= 1  # at most the clean pass that reads the feature width, never a noisy sample


def test_certify_rejects_bad_images():
    with pytest.raises(ValueError, match="NaN"):
        certify(ToyEncoder("angle"), toy_image(math.nan))
    with pytest.raises(ValueError, match="empty"):
        certify(ToyEncoder("angle"), [])
    assert as_smoothed_tower(ToyEncoder("angle"), 0.3).sigma == 0.3


# ----- feature_attack takes what certify takes ------------------------------------------------------------------------
def test_feature_attack_accepts_the_inputs_of_certify(llava):
    model, tower, pixels = llava
    kwargs = dict(steps=1, eot_samples=1, eval_samples=2, generator=torch.Generator().manual_seed(0))
    batch = feature_attack(tower, pixels, None, 0.1, input_space="pixel", **kwargs)
    assert isinstance(batch, list) and len(batch) == 2 and all(r.norm <= 0.1 + 1e-5 for r in batch)
    pil = Image.fromarray((pixels[0].permute(1, 2, 0) * 255).to(torch.uint8).numpy())
    assert isinstance(feature_attack(model, pil, None, 0.1, **kwargs), AttackResult)
    single = to_image_inputs(tower, pixels[:1], input_space="pixel")[0]
    reference = tower.clean_unit_features(single)[-1]
    assert isinstance(feature_attack(tower, single, reference, 0.1, **kwargs), AttackResult)
    with pytest.raises(ValueError, match="input_space"):
        feature_attack(tower, pixels, None, 0.1, **kwargs)
    with pytest.raises(ValueError, match="`reference` has 3 rows for 2 images"):
        feature_attack(tower, pixels, torch.ones(3, reference.numel()), 0.1, input_space="pixel", **kwargs)
    with pytest.raises(ValueError, match="`reference` has 4 values"):
        feature_attack(tower, single, torch.ones(4), 0.1, **kwargs)


# ----- the evaluate metric speaks certify's names ---------------------------------------------------------------------
def test_metric_uses_certify_argument_names(tmp_path):
    code = (
        "import hf_feature_smoothing.metrics as m, json, warnings\n"
        "c = m.load('certified_robustness', 'cosine')\n"
        "new = c.compute(score_lower=[0.9, 0.7], sigma=[0.25, 0.5], epsilon=[0.0, 0.1])\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    old = c.compute(score_lower=[0.9, 0.7], sigma=[0.25, 0.5], epsilons=[0.0, 0.1])\n"
        "a = m.load('certified_robustness', 'accuracy')\n"
        "acc = a.compute(prediction=[1, -1], label=[1, 0], radius=[0.2, 0.0], epsilon=[0.0, 0.3])\n"
        "try:\n"
        "    c.compute(score_lower=[0.9], sigma=[0.25], epsilon=[float('nan')]); error = ''\n"
        "except ValueError as e:\n"
        "    error = str(e)\n"
        "print(json.dumps([new, old, acc, [str(x.message) for x in w], error]))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "home")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    new, old, accuracy, warnings, error = json.loads(result.stdout.strip().splitlines()[-1])
    assert new == old and "certified_cosine@0.1" in new and accuracy["certified_accuracy@0.3"] == 0.0
    assert any("use `epsilon`" in w for w in warnings) and "`epsilon`" in error
