"""Fuzz-style properties of the Python API on broken inputs and files: every failure is a clear error naming the
argument or file, the value and the fix; a failure leaves the model exactly as it was; NaN never reaches a
certificate; a removed booster is gone from the config and the checkpoint; a config never claims a booster the
model does not hold."""

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import hf_feature_smoothing as hfs
from hf_feature_smoothing.booster import booster_layers, remove_boosters
from hf_feature_smoothing.booster.data import RandomCropFlip
from hf_feature_smoothing.booster.layer import booster_names
from hf_feature_smoothing.certification import certify, certify_prediction
from hf_feature_smoothing.testing_utils import tiny_inputs, tiny_model, tiny_smoothed_model
from hf_feature_smoothing.utils.validation import SEED_MAX, SIGMA_MAX


WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
SMOOTHING = dict(num_samples=2, seed=0, sigma=0.12)


# ----- helpers ------------------------------------------------------------------------------------------------------
def _snapshot(model) -> dict:
    """Everything a failed call must leave unchanged: classes, config, tensors, module types, booster state."""
    return {
        "class": type(model), "config_class": type(model.config), "config": model.config.to_dict(),
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "trainable": {k: p.requires_grad for k, p in model.named_parameters()},
        "modules": [(n, type(m)) for n, m in model.named_modules()],
        "boosters": booster_names(model), "peft_config": sorted(getattr(model, "peft_config", None) or {}),
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
    }


def _assert_unchanged(model, before: dict) -> None:
    after = _snapshot(model)
    for key in ("class", "config_class", "config", "modules", "boosters", "peft_config", "hooks", "trainable"):
        assert after[key] == before[key], key
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], before["state"][k]) for k in before["state"])


def _randomise(model) -> None:
    generator = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        if "fs_booster_" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.05


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A saved (random, non-identity) booster for the tiny LLaVA."""
    folder = tmp_path_factory.mktemp("adapter") / "gsb"
    peft_model = hfs.add_booster(tiny_smoothed_model("llava", **SMOOTHING), hfs.GSBConfig(sigmas=[0.12, 0.25]))
    _randomise(peft_model)
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture
def broken(adapter, tmp_path):
    """`broken(edit)`: a copy of the booster folder with `edit(folder)` applied."""
    def make(edit):
        folder = tmp_path / "broken"
        shutil.copytree(adapter, folder)
        edit(folder)
        return folder
    return make


def _truncate(name):
    def edit(folder):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
    return edit


def _random_bytes(name):
    def edit(folder):
        (folder / name).write_bytes(np.random.default_rng(0).bytes(300))
    return edit


def _config(value):
    def edit(folder):
        data = json.loads((folder / CONFIG).read_text())
        (folder / CONFIG).write_text(value if isinstance(value, str) else json.dumps(value(data)))
    return edit


def _drop_weight(folder):
    weights = load_file(folder / WEIGHTS)
    save_file(dict(sorted(weights.items())[1:]), folder / WEIGHTS, metadata={"format": "pt"})


def _poison_weight(folder):
    weights = load_file(folder / WEIGHTS)
    key = sorted(weights)[-1]
    weights[key] = torch.full_like(weights[key], math.nan)
    save_file(weights, folder / WEIGHTS, metadata={"format": "pt"})


# every broken booster folder, with the error type and what the message must say (file, value, cause, fix)
BROKEN_BOOSTERS = {
    "truncated weights": (_truncate(WEIGHTS), ValueError, rf"{WEIGHTS}.*corrupt or truncated.*(Download|re-save)"),
    "random weights": (_random_bytes(WEIGHTS), ValueError, rf"{WEIGHTS}.*corrupt or truncated.*re-save"),
    "LoRA config": (_config(lambda d: {**d, "peft_type": "LORA"}), ValueError, rf"{CONFIG}.*'LORA'.*PeftModel"),
    "unknown peft_type": (_config(lambda d: {**d, "peft_type": "NOPE"}), ValueError, rf"{CONFIG}.*'NOPE'"),
    "no peft_type": (_config(lambda d: {k: v for k, v in d.items() if k != "peft_type"}), ValueError,
                     rf"{CONFIG}.*`peft_type` None"),
    "JSON list": (_config(lambda d: [d]), ValueError, rf"{CONFIG}.*JSON object.*got a JSON list"),
    "not JSON": (_config("{not json"), ValueError, rf"{CONFIG}.*not valid JSON"),
    "missing config": (lambda f: (f / CONFIG).unlink(), FileNotFoundError, rf"no `{CONFIG}`"),
    "missing weights": (lambda f: (f / WEIGHTS).unlink(), FileNotFoundError, rf"no `{WEIGHTS}`"),
    "missing key": (_drop_weight, ValueError, rf"{WEIGHTS}.*missing keys"),
    "NaN weight": (_poison_weight, ValueError, rf"{WEIGHTS} has NaN or inf.*Re-save"),
}


# ----- files --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["stock", "smoothed", "boosted"])
@pytest.mark.parametrize("case", sorted(BROKEN_BOOSTERS))
def test_a_broken_booster_fails_naming_the_file_and_leaves_the_model_as_it_was(case, kind, broken, adapter):
    edit, error, message = BROKEN_BOOSTERS[case]
    folder = broken(edit)
    model = tiny_model("llava") if kind == "stock" else tiny_smoothed_model("llava", **SMOOTHING)
    if kind == "boosted":
        hfs.load_booster(model, adapter)  # a booster already held stays, active, untouched
    before = _snapshot(model)
    with pytest.raises(error, match=message):
        hfs.load_booster(model, folder, adapter_name="other")
    _assert_unchanged(model, before)
    if kind == "boosted":
        assert all(layer.active_adapters == ["default"] for layer in booster_layers(model))
    if "missing" not in case:  # the message names the file itself, not a parent folder
        with pytest.raises(error, match=str(folder).replace("\\", "\\\\")):
            hfs.load_booster(model, folder, adapter_name="other")


@pytest.mark.parametrize("edit", [_truncate("model.safetensors"), _random_bytes("model.safetensors")])
def test_a_corrupt_model_checkpoint_is_named(edit, tmp_path):
    tiny_smoothed_model("llava", **SMOOTHING).save_pretrained(tmp_path / "model")
    edit(tmp_path / "model")
    with pytest.raises(ValueError, match=r"model\.safetensors`: the safetensors file is corrupt or truncated.*"
                                         r"force_download=True.*save_pretrained"):
        hfs.SmoothedLlavaForConditionalGeneration.from_pretrained(tmp_path / "model")


# ----- images -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llava():
    model = tiny_model("llava")
    tower = hfs.SmoothedVisionTower(model, hfs.FeatureSmoothingConfig(**SMOOTHING))
    return model, tower, tiny_inputs(model)["pixel_values"]


@pytest.mark.parametrize("channels, message", [(1, r"1 channel .*grayscale.*repeat\(1, 3, 1, 1\).*same in R, G and B"),
                                               (4, r"4 channels .*RGBA.*drop the alpha channel"),
                                               (2, r"2 channels .*takes 3")])
def test_images_with_other_channel_counts_are_refused_naming_the_fix(channels, message, llava):
    _, tower, good = llava
    pixels = torch.rand(1, 3, *good.shape[2:], generator=torch.Generator().manual_seed(0))
    bad_processed = good[:, :1].repeat(1, channels, 1, 1)
    bad_pixels = pixels[:, :1].repeat(1, channels, 1, 1)
    prototypes = torch.randn(2, 256)
    calls = [lambda: tower(bad_processed), lambda: certify(tower, bad_processed, n=2, n0=1),
             lambda: certify(tower, bad_processed, n=2, n0=1, input_space="processed"),
             lambda: certify(tower, bad_pixels, n=2, n0=1, input_space="pixel"),
             lambda: certify(tower, bad_pixels, n=2, n0=1),  # never "out of range", never "ambiguous"
             lambda: certify_prediction(tower, bad_processed, prototypes, n=2, n0=1)]
    for call in calls:
        with pytest.raises(ValueError, match=message):
            call()


def test_qwen_patch_rows_of_one_channel_are_refused():
    model = tiny_model("qwen2_vl")
    tower = hfs.SmoothedVisionTower(model, hfs.FeatureSmoothingConfig(**SMOOTHING))
    inputs = tiny_inputs(model)
    rows = inputs["pixel_values"]
    one_channel = rows[:, : rows.shape[1] // 3]
    with pytest.raises(ValueError, match="1 channel .*grayscale"):
        tower(one_channel, inputs["image_grid_thw"])
    with pytest.raises(ValueError, match="rows have 5 values"):
        tower(rows[:, :5], inputs["image_grid_thw"])


def test_the_tower_reads_its_channel_count_from_the_config():
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          image_size=28, patch_size=14, num_channels=1)
    tower = hfs.SmoothedVisionTower(Dinov2Model(config).eval(), hfs.FeatureSmoothingConfig(**SMOOTHING))
    assert tower.family.num_channels == 1
    tower.family.check_channels("pixel_values", torch.zeros(1, 1, 28, 28))  # what the tower expects: accepted
    with pytest.raises(ValueError, match="3 channels .*takes 1"):
        tower.family.check_channels("pixel_values", torch.zeros(1, 3, 28, 28))


# ----- numbers ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [2**64 + 5, 2**64 - 1, SEED_MAX + 1, -1, 1.5, True, np.bool_(True), "3",
                                  torch.tensor(2.0)])
def test_bad_seeds_are_refused_where_seeds_are_taken(seed, llava):
    _, tower, good = llava
    for call in (lambda: hfs.FeatureSmoothingConfig(seed=seed), lambda: tower.manual_seed(seed),
                 lambda: certify(tower, good, n=2, n0=1, seed=seed), lambda: RandomCropFlip(seed)):
        with pytest.raises((TypeError, ValueError), match=r"`seed` must be a finite integer in \[0, "):
            call()
    assert tower.config.seed == SMOOTHING["seed"]  # a refused reseed changes nothing


@pytest.mark.parametrize("seed", [SEED_MAX, np.int64(7), torch.tensor(7)])
def test_every_accepted_seed_seeds_a_forward_pass(seed, llava):
    model, _, good = llava
    tower = hfs.SmoothedVisionTower(model, hfs.FeatureSmoothingConfig(num_samples=1, seed=seed))
    assert type(tower.config.seed) is int
    json.dumps(tower.config.to_dict())
    assert torch.isfinite(tower(good)[0]).all()


@pytest.mark.parametrize("sigma", [1e308, SIGMA_MAX * 1.01, math.inf, 0.0, -0.25, True, torch.tensor(True)])
def test_sigmas_beyond_meaning_are_refused_everywhere(sigma, llava):
    model, tower, good = llava
    for call in (lambda: hfs.FeatureSmoothingConfig(sigma=sigma), lambda: certify(tower, good, sigma=sigma, n=2, n0=1),
                 lambda: certify(model, good, sigma=sigma, n=2, n0=1), lambda: hfs.GSBConfig(sigmas=[sigma])):
        with pytest.raises((TypeError, ValueError), match="`sigmas?` must be"):
            call()


@pytest.mark.parametrize("entry", ["certify", "certify_prediction"])
def test_nan_features_never_reach_a_certificate(entry, llava):
    model = tiny_model("llava")
    tower = hfs.SmoothedVisionTower(model, hfs.FeatureSmoothingConfig(**SMOOTHING))
    good = llava[2]
    with torch.no_grad():
        model.model.vision_tower.embeddings.position_embedding.weight[0, 0] = math.inf  # a tower that overflows
    with pytest.raises(ValueError, match=r"NaN or inf features .*σ=0\.12.*no certificate"):
        if entry == "certify":
            certify(tower, good, n=2, n0=1, input_space="processed")
        else:
            certify_prediction(tower, good, torch.randn(2, 256), n=2, n0=1, input_space="processed")


def test_num_samples_zero_is_refused_and_none_means_the_config(llava):
    _, tower, good = llava
    for bad in (0, -1, 1.0, True):
        with pytest.raises((TypeError, ValueError), match="`num_samples` must be"):
            tower(good, num_samples=bad)
    tower.manual_seed(3)
    default = tower(good)[0]
    tower.manual_seed(3)
    assert torch.equal(tower(good, num_samples=None)[0], default)
    tower.manual_seed(3)
    assert torch.equal(tower(good, num_samples=SMOOTHING["num_samples"])[0], default)


def test_scalars_of_any_kind_are_numbers_and_stay_json(llava):
    _, tower, good = llava
    config = hfs.FeatureSmoothingConfig(sigma=torch.tensor(0.25), num_samples=np.int64(3), chunk_size=torch.tensor(4),
                                        seed=np.uint32(5))
    assert (config.sigma, config.num_samples, config.chunk_size, config.seed) == (0.25, 3, 4, 5)
    assert all(type(v) in (float, int) for v in (config.sigma, config.num_samples, config.chunk_size, config.seed))
    json.dumps(config.to_dict())
    for alpha in (np.float64(0.001), np.float32(0.01), torch.tensor(0.001), np.array(0.001)):
        (certificate,) = certify(tower, good, alpha=alpha, sigma=np.float64(0.12), n=np.int64(2), n0=torch.tensor(1),
                                 seed=np.int64(0), input_space="processed")
        assert type(certificate.alpha) is float and certificate.alpha == pytest.approx(float(alpha))
        assert type(certificate.n) is int and type(certificate.n0) is int and type(certificate.sigma) is float
        json.loads(json.dumps(certificate.to_dict(), allow_nan=False))
    for bad in (np.bool_(True), torch.tensor(True), torch.tensor([0.001, 0.002])):
        with pytest.raises((TypeError, ValueError), match="`alpha` must be"):
            certify(tower, good, alpha=bad, n=2, n0=1)
    # a target within reach of n = 64 samples at the tower's σ (with n = 2 none is: refused before sampling)
    (certificate,) = certify(tower, good, epsilon=[np.float32(0.0625), torch.tensor(0.03125)], tau=np.float64(0.5),
                             target_cosine=torch.tensor(0.25), n=np.int64(64), n0=1, seed=0, input_space="processed")
    assert certificate.epsilon == [0.0625, 0.03125] and certificate.tau == [0.5]
    assert type(certificate.target_cosine) is float and certificate.target_cosine == 0.25
    for bad in (True, [0.1, True], np.bool_(True), torch.tensor(True)):
        with pytest.raises(TypeError, match="`epsilon` must be a number or a list of numbers"):
            certify(tower, good, epsilon=bad, n=2, n0=1)


# ----- boosters: removal, claims ------------------------------------------------------------------------------------
def test_a_removed_booster_is_gone_from_config_and_checkpoint(adapter, tmp_path):
    plain = tiny_smoothed_model("llava", **SMOOTHING)
    model = tiny_smoothed_model("llava", **SMOOTHING)
    hfs.load_booster(model, adapter)
    remove_boosters(model)
    assert model.smoothing_config.booster is None and model.smoothing_config.booster_config is None
    assert not booster_layers(model) and not hasattr(model, "peft_config")
    assert model.config.to_dict() == plain.config.to_dict()
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())["feature_smoothing"]
    assert saved["booster"] is None and saved["booster_config"] is None
    assert not any("fs_booster_" in k for k in load_file(tmp_path / "saved" / "model.safetensors"))
    reloaded = hfs.SmoothedLlavaForConditionalGeneration.from_pretrained(tmp_path / "saved")
    assert not booster_layers(reloaded) and reloaded.smoothing_config.booster is None
    ours, theirs = model.state_dict(), reloaded.state_dict()
    assert ours.keys() == theirs.keys() == plain.state_dict().keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)  # bit-exact
    inputs = tiny_inputs(model)
    logits = []
    for m in (model, reloaded):
        m.smoothed_vision_tower.manual_seed(0)
        with torch.no_grad():
            logits.append(m(**inputs).logits)
    assert torch.equal(*logits)


def test_remove_boosters_on_a_tower_clears_its_config(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          image_size=28, patch_size=14)
    peft_model = hfs.add_booster(Dinov2Model(config).eval())
    peft_model.save_pretrained(tmp_path / "adapter")
    encoder = hfs.load_booster(Dinov2Model(config).eval(), tmp_path / "adapter")
    tower = hfs.SmoothedVisionTower(encoder, hfs.FeatureSmoothingConfig(booster=str(tmp_path / "adapter")))
    remove_boosters(tower)
    assert tower.config.booster is None and not booster_layers(tower) and not hasattr(encoder, "peft_config")


def test_a_config_never_claims_a_booster_that_is_not_attached(adapter, tmp_path):
    model = tiny_model("llava")
    before = _snapshot(model)
    config = hfs.FeatureSmoothingConfig(booster=str(adapter), **SMOOTHING)
    with pytest.raises(ValueError, match=r"`config.booster` is .* holds no booster.*load_booster\(model, .*"
                                         r"from_pretrained\(checkpoint, smoothing=\{'booster'"):
        hfs.SmoothedVisionTower(model, config)
    _assert_unchanged(model, before)
    smoothed = tiny_smoothed_model("llava", **SMOOTHING)
    smoothed.smoothing_config.booster = str(adapter)  # named by hand, never loaded
    with pytest.raises(ValueError, match=r"`smoothing_config.booster` is .* holds no booster.*load_booster"):
        smoothed.save_pretrained(tmp_path / "claims")
    assert not (tmp_path / "claims").exists()
    # the supported ways attach it, and then the config names it
    smoothed.smoothing_config.booster = None
    smoothed.save_pretrained(tmp_path / "plain")
    loaded = hfs.SmoothedLlavaForConditionalGeneration.from_pretrained(tmp_path / "plain", smoothing={"booster": str(adapter)})
    assert loaded.smoothing_config.booster == str(adapter) and booster_names(loaded) == ["default"]
    hfs.load_booster(model, adapter)
    assert hfs.SmoothedVisionTower(model, config).config.booster == str(adapter)


def test_projected_features_are_refused_on_an_encoder_without_a_projector():
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          image_size=28, patch_size=14)
    tower = hfs.SmoothedVisionTower(Dinov2Model(config).eval(), hfs.FeatureSmoothingConfig(smoothed_features="projected"))
    with pytest.raises(ValueError, match=r"`smoothed_features='projected'` .* `dinov2` encoder has no projector"):
        tower(torch.rand(1, 3, 28, 28))


def test_a_stand_alone_tower_never_claims_or_saves_a_booster_it_does_not_run(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          image_size=28, patch_size=14)
    peft_model = hfs.add_booster(Dinov2Model(config).eval())
    peft_model.save_pretrained(tmp_path / "adapter")
    described = {"adapter_name": "default", "config": json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())}
    for claim in ({"booster": "org/some-gsb", "booster_config": described}, {"booster_config": described}):
        with pytest.raises(ValueError, match=r"`config.booster(_config)?` .* holds no(ne| booster)"):
            hfs.SmoothedVisionTower(Dinov2Model(config).eval(), hfs.FeatureSmoothingConfig(**claim))
    tower = hfs.SmoothedVisionTower(Dinov2Model(config).eval(), hfs.FeatureSmoothingConfig())
    tower.config.booster = "org/some-gsb"  # named by hand, never loaded
    with pytest.raises(ValueError, match=r"`smoothing_config.booster` is 'org/some-gsb' but the model holds no booster"):
        tower.save_pretrained(tmp_path / "claims")
    assert not (tmp_path / "claims").exists()
    encoder = hfs.load_booster(Dinov2Model(config).eval(), tmp_path / "adapter")
    tower = hfs.SmoothedVisionTower(encoder, hfs.FeatureSmoothingConfig(booster=str(tmp_path / "adapter")))
    for layer in booster_layers(tower):
        layer.enable_adapters(False)
    with pytest.raises(ValueError, match=r"Booster `default` is disabled"):
        tower.save_pretrained(tmp_path / "disabled")
    assert not (tmp_path / "disabled").exists()


def test_a_failing_booster_in_from_pretrained_leaves_no_claim(broken, tmp_path):
    folder = broken(_truncate(WEIGHTS))
    tiny_smoothed_model("llava", **SMOOTHING).save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match=rf"{WEIGHTS}.*corrupt"):
        hfs.SmoothedLlavaForConditionalGeneration.from_pretrained(tmp_path / "plain", smoothing={"booster": str(folder)})
    assert os.path.exists(tmp_path / "plain" / "config.json")  # the checkpoint itself is untouched
    saved = json.loads((tmp_path / "plain" / "config.json").read_text())["feature_smoothing"]
    assert saved["booster"] is None
