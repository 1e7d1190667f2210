import logging

import pytest

from hf_feature_smoothing import FeatureSmoothingConfig


def test_defaults_and_round_trip():
    config = FeatureSmoothingConfig(sigma=0.5, num_samples=4, seed=3, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    again = FeatureSmoothingConfig.from_dict(config.to_dict())
    assert again == config
    assert FeatureSmoothingConfig().sigma == 0.25


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sigma=0.0), "`sigma`.*got 0.0"),
        (dict(sigma=-1), "`sigma`"),
        (dict(sigma=float("nan")), "`sigma`"),
        (dict(sigma=float("inf")), "`sigma`"),
        (dict(sigma="0.2"), "`sigma`"),
        (dict(num_samples=0), "`num_samples`.*got 0"),
        (dict(num_samples=2.5), "`num_samples`"),
        (dict(chunk_size=-3), "`chunk_size`"),
        (dict(autocast_dtype="int8"), "`autocast_dtype`.*int8"),
        (dict(smoothed_features="logits"), "`smoothed_features`.*logits"),
        (dict(image_std=[0.2, 0.0, 0.2]), "`image_std`"),
        (dict(image_mean=[0.5, 0.5]), "`image_mean`"),
    ],
)
def test_bad_values_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FeatureSmoothingConfig(**kwargs)


def test_unknown_keys_from_newer_versions_warn(caplog):
    data = {**FeatureSmoothingConfig().to_dict(), "future_knob": 1}
    with caplog.at_level(logging.WARNING):
        config = FeatureSmoothingConfig.from_dict(data)
    assert config == FeatureSmoothingConfig()


def test_from_dict_rejects_non_dicts():
    with pytest.raises(TypeError, match="feature_smoothing"):
        FeatureSmoothingConfig.from_dict([0.25])


def test_fields_are_validated_when_set_after_construction():
    config = FeatureSmoothingConfig(sigma=0.3, seed=2)
    for name, value, match in (("sigma", -1.0, "`sigma`"), ("num_samples", 0, "`num_samples`"),
                               ("image_std", [0.2, 0.0, 0.2], "`image_std`"), ("smoothed_features", "x", "smoothed")):
        with pytest.raises(ValueError, match=match):
            setattr(config, name, value)
    with pytest.raises(TypeError, match="`seed`"):
        config.seed = 1.5
    assert config == FeatureSmoothingConfig(sigma=0.3, seed=2)  # nothing changed


def test_update_is_all_or_nothing_and_overrides_name_only_what_is_set():
    config = FeatureSmoothingConfig(sigma=0.3, seed=2)
    with pytest.raises(ValueError, match="`num_samples`"):
        config.update({"sigma": 0.5, "num_samples": 0})
    assert config.sigma == 0.3
    config.update({"sigma": 0.5})
    assert (config.sigma, config.seed) == (0.5, 2)
    assert FeatureSmoothingConfig.overrides({"seed": None}) == {"seed": None}
    assert FeatureSmoothingConfig.overrides(FeatureSmoothingConfig(sigma=0.5)) == {"sigma": 0.5}
    with pytest.raises(ValueError, match="sgima"):
        FeatureSmoothingConfig.overrides({"sgima": 0.5})
    with pytest.raises(ValueError, match="booster_config"):
        FeatureSmoothingConfig(booster_config={"config": {}})
