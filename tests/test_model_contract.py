"""The smoothed-model contract under everyday actions: save with a booster, copy, cast, edit, reload, override."""

import copy
import json
import logging
import shutil

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText

import hf_feature_smoothing as hfs
from hf_feature_smoothing.booster import booster_layers
from hf_feature_smoothing.testing_utils import tiny_inputs, tiny_model, tiny_smoothed_model


def _randomise_booster(model, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "fs_booster_" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.05


def _logits(model, inputs, seed: int = 0) -> torch.Tensor:
    model.smoothed_vision_tower.manual_seed(seed)
    with torch.no_grad():
        return model(**inputs).logits


def _tower_passes(model, inputs) -> int:
    """Images the vision tower sees in one forward (copy #1 in the model's own call + the Monte Carlo copies)."""
    adapter = model.smoothed_vision_tower.family
    seen = []

    def count(module, args, kwargs):
        seen.append(adapter.inputs_from_call(args, kwargs).num_images)

    handle = adapter.tower().register_forward_pre_hook(count, with_kwargs=True, prepend=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    return sum(seen)


@pytest.fixture
def stock_dir(tmp_path):
    tiny_model("llava").save_pretrained(tmp_path / "stock")
    (tmp_path / "stock" / "preprocessor_config.json").write_text(
        '{"image_mean": [0.4, 0.4, 0.4], "image_std": [0.2, 0.25, 0.3]}')
    return tmp_path / "stock"


@pytest.fixture
def booster_dir(tmp_path):
    peft_model = hfs.add_booster(tiny_smoothed_model("llava", num_samples=3, seed=0))
    _randomise_booster(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_smoothed_model_with_booster_saves_full_weights_and_reloads_bit_exact_offline(stock_dir, booster_dir, tmp_path):
    model = hfs.SmoothedLlavaForConditionalGeneration.from_pretrained(
        stock_dir, smoothing={"num_samples": 3, "seed": 0, "booster": str(booster_dir)})
    inputs = tiny_inputs(model)
    expected = _logits(model, inputs)
    model.save_pretrained(tmp_path / "saved")
    shutil.rmtree(booster_dir)  # the reload must not need the booster it was built with (no network, no folder)

    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["model_type"] == "smoothed_llava"
    assert config["feature_smoothing"]["booster_config"]["adapter_name"] == "default"
    assert any(".fs_booster_mapper." in k for k in load_file(tmp_path / "saved" / "model.safetensors"))
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "saved")
    assert type(again) is hfs.SmoothedLlavaForConditionalGeneration and len(booster_layers(again)) == 1
    assert again.smoothing_config == model.smoothing_config
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(_logits(again, inputs), expected)
    # saving the reloaded model again gives the same checkpoint
    again.save_pretrained(tmp_path / "saved2")
    assert json.loads((tmp_path / "saved2" / "config.json").read_text())["feature_smoothing"] == config["feature_smoothing"]


def test_booster_attached_through_peft_is_saved_with_the_base_model(tmp_path):
    model = tiny_smoothed_model("llava", num_samples=3, seed=0)
    _randomise_booster(hfs.add_booster(model))
    inputs = tiny_inputs(model)
    expected = _logits(model, inputs)
    model.save_pretrained(tmp_path / "saved")  # the base model of the PeftModel, booster inside
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "saved")
    assert torch.equal(_logits(again, inputs), expected)


@pytest.mark.parametrize("config", [dict(purifier=True, mapper=False), dict(purifier=True, mapper_mixing="attention")],
                         ids=["purifier", "purifier+attention"])
def test_smoothed_model_with_a_purifier_booster_saves_and_reloads_bit_exact(config, tmp_path):
    model = tiny_smoothed_model("llava", num_samples=3, seed=0)
    _randomise_booster(hfs.add_booster(model, hfs.GSBConfig(sigmas=[0.25], hidden_dim=16, **config)))
    inputs = tiny_inputs(model)
    expected = _logits(model, inputs)
    model.save_pretrained(tmp_path / "saved")
    weights = load_file(tmp_path / "saved" / "model.safetensors")
    assert any(".fs_booster_purifier." in k for k in weights)
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "saved")
    assert again.smoothing_config.booster_config["config"]["purifier"]
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(_logits(again, inputs), expected)


def test_disabled_booster_is_not_saved_as_if_active(tmp_path):
    model = tiny_smoothed_model("llava", num_samples=2)
    peft_model = hfs.add_booster(model)
    with peft_model.disable_adapter(), pytest.raises(ValueError, match="disabled"):
        model.save_pretrained(tmp_path / "saved")


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_deepcopy_to_and_half_keep_their_own_smoothing(family):
    n = 5
    model = tiny_smoothed_model(family, num_samples=n, seed=0)
    inputs = tiny_inputs(model)
    reference = _logits(model, inputs)
    copied = copy.deepcopy(model)
    assert copied.smoothed_vision_tower.encoder is copied
    assert copied.smoothing_config is copied.config.feature_smoothing is copied.smoothed_vision_tower.config
    assert copied.smoothing_config is not model.smoothing_config
    assert _tower_passes(copied, inputs) == n and _tower_passes(model, inputs) == n
    torch.testing.assert_close(_logits(copied, inputs), reference, rtol=0, atol=0)
    copied.smoothing_config.num_samples = 3  # the copy's config drives the copy only
    assert _tower_passes(copied, inputs) == 3 and _tower_passes(model, inputs) == n

    moved = copy.deepcopy(model).to("cpu")
    assert _tower_passes(moved, inputs) == n
    for cast in (lambda m: m.half(), lambda m: m.to(torch.bfloat16)):
        low = cast(copy.deepcopy(model))
        low_inputs = {k: v.to(low.dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        assert _tower_passes(low, low_inputs) == n
        seen = []
        site = low.smoothed_vision_tower.family.site_modules()[-1]
        handle = site.register_forward_pre_hook(lambda m, a: seen.append(a[0].float()))
        _logits(low, low_inputs)
        handle.remove()
        full = []
        handle = model.smoothed_vision_tower.family.site_modules()[-1].register_forward_pre_hook(
            lambda m, a: full.append(a[0].float()))
        _logits(model, inputs)
        handle.remove()
        # the same seeded noise in pixel space: the smoothed features agree up to the cast's rounding
        cosine = torch.nn.functional.cosine_similarity(seen[-1].flatten(), full[-1].flatten(), dim=0)
        assert cosine > 0.99, cosine


def test_one_source_of_truth_for_the_smoothing_parameters(tmp_path):
    model = tiny_smoothed_model("llava", num_samples=3, seed=1)
    tower = model.smoothed_vision_tower
    assert model.smoothing_config is model.config.feature_smoothing is tower.config is tower.family.config
    model.smoothing_config.sigma = 0.4
    assert model.config.feature_smoothing.sigma == tower.sigma == 0.4
    model.config.feature_smoothing = {"sigma": 0.3, "num_samples": 2, "seed": 9}
    assert tower.config.sigma == 0.3 and tower.config.num_samples == 2 and model.smoothing_config.seed == 9
    tower.manual_seed(11)
    model.smoothing_config = hfs.FeatureSmoothingConfig(sigma=0.2, num_samples=2, seed=11, image_mean=[0.5] * 3,
                                                        image_std=[0.5] * 3)
    assert tower.family.image_mean == (0.5, 0.5, 0.5)  # the noise space follows the edit at once
    with pytest.raises(ValueError, match="`sigma`"):
        model.smoothing_config.sigma = -1.0
    with pytest.raises(ValueError, match="`num_samples`"):
        model.config.feature_smoothing = {"num_samples": 0}
    with pytest.raises(ValueError, match=r"`image_mean` must be on the \[0, 1\] pixel scale .* divide 0–255"):
        model.smoothing_config.image_mean = [123.675, 116.28, 103.53]
    assert model.smoothing_config.sigma == 0.2 and model.smoothing_config.num_samples == 2
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())["feature_smoothing"]
    card = ModelCard.load(tmp_path / "saved" / "README.md").text
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "saved")
    live = model.smoothing_config.to_dict()
    assert saved == live and again.smoothing_config.to_dict() == live
    assert json.dumps(live, indent=1, sort_keys=True) in card and "| 0.2 | 2 | 11 | vision |" in card


def test_overriding_one_field_keeps_the_others(tmp_path, stock_dir):
    model = hfs.SmoothedLlavaForConditionalGeneration.from_pretrained(
        stock_dir, smoothing={"sigma": 0.12, "num_samples": 3, "seed": 7, "chunk_size": 5})
    assert model.smoothing_config.image_mean == [0.4, 0.4, 0.4]  # read from preprocessor_config.json
    model.save_pretrained(tmp_path / "saved")
    for override in ({"sigma": 0.5}, hfs.FeatureSmoothingConfig(sigma=0.5)):
        again = hfs.SmoothedLlavaForConditionalGeneration.from_pretrained(tmp_path / "saved", smoothing=override)
        assert again.smoothing_config.sigma == 0.5
        assert (again.smoothing_config.seed, again.smoothing_config.num_samples, again.smoothing_config.chunk_size,
                again.smoothing_config.image_std) == (7, 3, 5, [0.2, 0.25, 0.3])
    reset = hfs.SmoothedLlavaForConditionalGeneration.from_pretrained(tmp_path / "saved", smoothing={"seed": None})
    assert reset.smoothing_config.seed is None and reset.smoothing_config.sigma == 0.12
    with pytest.raises(ValueError, match="sgima"):
        hfs.SmoothedLlavaForConditionalGeneration.from_pretrained(tmp_path / "saved", smoothing={"sgima": 0.5})


def test_from_pretrained_with_config_and_smoothing(tmp_path, stock_dir):
    model = hfs.SmoothedLlavaForConditionalGeneration.from_pretrained(stock_dir, smoothing={"seed": 3})
    model.save_pretrained(tmp_path / "saved")
    cfg = hfs.SmoothedLlavaConfig.from_pretrained(tmp_path / "saved")
    before = cfg.feature_smoothing.to_dict()
    again = hfs.SmoothedLlavaForConditionalGeneration.from_pretrained(tmp_path / "saved", config=cfg,
                                                                      smoothing={"sigma": 0.6})
    assert again.smoothing_config.sigma == 0.6 and again.smoothing_config.seed == 3
    assert cfg.feature_smoothing.to_dict() == before  # the caller's config is not edited
    stock_cfg = tiny_model("llava").config
    wrapped = AutoModelForImageTextToText.from_pretrained(stock_dir, config=stock_cfg, smoothing={"sigma": 0.7})
    assert type(wrapped) is hfs.SmoothedLlavaForConditionalGeneration and wrapped.smoothing_config.sigma == 0.7


def test_auto_class_accepts_smoothing_for_stock_and_smoothed_checkpoints(tmp_path, stock_dir):
    model = AutoModelForImageTextToText.from_pretrained(stock_dir, smoothing={"sigma": 0.3, "seed": 2})
    assert type(model) is hfs.SmoothedLlavaForConditionalGeneration and model.smoothing_config.sigma == 0.3
    model.save_pretrained(tmp_path / "saved")
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "saved", smoothing={"num_samples": 4})
    assert (again.smoothing_config.sigma, again.smoothing_config.seed, again.smoothing_config.num_samples) == (0.3, 2, 4)
    assert type(AutoModelForImageTextToText.from_pretrained(stock_dir)).__name__ == "LlavaForConditionalGeneration"


def test_public_reseed():
    model = tiny_smoothed_model("llava", num_samples=3)
    inputs = tiny_inputs(model)
    a, b, c = _logits(model, inputs, 5), _logits(model, inputs, 5), _logits(model, inputs, 6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert model.smoothing_config.seed == 6  # the reseed is part of the config that is saved


def test_stock_model_type_with_a_smoothing_block_warns(tmp_path, caplog):
    stock = tiny_model("llava")
    stock.config.feature_smoothing = {"sigma": 0.25}
    stock.save_pretrained(tmp_path / "stock")
    with caplog.at_level(logging.WARNING):
        loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "stock")
    assert type(loaded).__name__ == "LlavaForConditionalGeneration"
    assert "WITHOUT smoothing" in caplog.text and "smoothed_llava" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the smoothed class honours the block: no warning
        smoothed = hfs.SmoothedLlavaForConditionalGeneration.from_pretrained(tmp_path / "stock")
    assert "WITHOUT smoothing" not in caplog.text and smoothed.smoothing_config.sigma == 0.25


def test_non_finite_weights_fail_naming_the_tensor(tmp_path):
    tiny_smoothed_model("llava").save_pretrained(tmp_path / "saved")
    weights = load_file(tmp_path / "saved" / "model.safetensors")
    key = next(k for k in weights if "vision_tower" in k and k.endswith("weight"))
    weights[key][0] = float("nan")
    save_file(weights, tmp_path / "saved" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"NaN or inf"):
        AutoModelForImageTextToText.from_pretrained(tmp_path / "saved")


def test_top_level_exports():
    from hf_feature_smoothing import GSBTrainer, certify, certify_prediction
    from hf_feature_smoothing.booster import GSBTrainer as trainer
    from hf_feature_smoothing.certification import certify as certify_fn

    assert GSBTrainer is trainer and certify is certify_fn and callable(certify_prediction)


def test_smoothing_config_is_accepted_wherever_smoothing_is(tmp_path, stock_dir):
    """transformers names such arguments `*_config=` (`quantization_config=`): `smoothing_config=` and its alias
    `smoothing=` give the same model on every `from_pretrained`; both at once is refused."""
    overrides = {"sigma": 0.3, "seed": 2, "num_samples": 3}
    for load in (AutoModelForImageTextToText.from_pretrained, hfs.SmoothedLlavaForConditionalGeneration.from_pretrained):
        a = load(stock_dir, smoothing_config=overrides)
        b = load(stock_dir, smoothing=overrides)
        assert a.smoothing_config == b.smoothing_config and a.smoothing_config.sigma == 0.3
        with pytest.raises(ValueError, match="not both"):
            load(stock_dir, smoothing=overrides, smoothing_config=overrides)
    a.save_pretrained(tmp_path / "saved")
    tower = hfs.SmoothedVisionTower.from_pretrained(tmp_path / "saved", smoothing_config={"sigma": 0.5})
    assert tower.config.sigma == 0.5 and tower.config.seed == 2
