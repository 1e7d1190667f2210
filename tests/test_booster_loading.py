"""Boosters load strictly (every path), and a booster loaded into an unsmoothed model is never a silent no-op."""

import json
import logging

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

import hf_feature_smoothing as hfs
from hf_feature_smoothing.booster import booster_layers
from hf_feature_smoothing.testing_utils import tiny_inputs, tiny_model, tiny_smoothed_model


FILE = "adapter_model.safetensors"


def _randomise_booster(model) -> None:
    generator = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        if "fs_booster_" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.05


def _logits(model, inputs) -> torch.Tensor:
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    base.smoothed_vision_tower.manual_seed(0)
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture
def booster_dir(tmp_path):
    model = tiny_smoothed_model("llava", num_samples=3, seed=0, sigma=0.12)
    peft_model = hfs.add_booster(model, hfs.GSBConfig(sigmas=[0.12, 0.25]))
    _randomise_booster(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def _edit(folder, edit) -> None:
    weights = load_file(folder / FILE)
    save_file(edit(weights), folder / FILE, metadata={"format": "pt"})


def _drop_one(weights):
    return dict(sorted(weights.items())[1:])


def _rename_one(weights):
    key = sorted(weights)[0]
    return {**{k: v for k, v in weights.items() if k != key}, key.replace("fc1", "fc_1").replace("film", "flim"): weights[key]}


def _extra(weights):
    key = sorted(weights)[0]
    return {**weights, key.replace("fs_booster_mapper.", "fs_booster_mapper.extra."): weights[key].clone()}


@pytest.mark.parametrize("edit, keys", [
    (_drop_one, "missing keys \\['.*fs_booster_mapper"),
    (_rename_one, "unexpected \\(renamed or extra\\) keys \\['.*(fc_1|flim)"),
    (_extra, "unexpected \\(renamed or extra\\) keys \\['.*extra"),
    (lambda weights: {}, "empty"),
])
@pytest.mark.parametrize("loader", ["load_booster", "PeftModel"])
def test_mismatched_booster_files_fail_naming_file_and_keys(booster_dir, edit, keys, loader):
    _edit(booster_dir, edit)
    model = tiny_smoothed_model("llava", num_samples=3, seed=0)
    with pytest.raises(ValueError, match=f"{FILE}.*{keys}" if keys != "empty" else f"{FILE}.* are empty"):
        if loader == "load_booster":
            hfs.load_booster(model, booster_dir)
        else:
            PeftModel.from_pretrained(model, booster_dir)


def test_non_finite_booster_weights_fail_naming_the_tensor(booster_dir):
    def poison(weights):
        key = sorted(weights)[-1]
        weights[key] = torch.full_like(weights[key], float("inf"))
        return weights

    _edit(booster_dir, poison)
    with pytest.raises(ValueError, match=r"Tensor `.*fs_booster_mapper.*` loaded from .*adapter_model.safetensors has NaN"):
        hfs.load_booster(tiny_smoothed_model("llava"), booster_dir)


def test_saved_full_model_with_a_broken_booster_fails(booster_dir, tmp_path):
    model = tiny_smoothed_model("llava", num_samples=3, seed=0)
    hfs.load_booster(model, booster_dir)
    model.save_pretrained(tmp_path / "full")
    weights = load_file(tmp_path / "full" / "model.safetensors")
    key = next(k for k in weights if "fs_booster_mapper" in k)
    weights[key.replace("fc1", "fc_1").replace("film", "flim")] = weights.pop(key)
    save_file(weights, tmp_path / "full" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"do not match the booster .* missing keys \['.*fs_booster_mapper"):
        hfs.SmoothedLlavaForConditionalGeneration.from_pretrained(tmp_path / "full")


def test_booster_records_the_smoothing_it_was_attached_under(booster_dir):
    config = json.loads((booster_dir / "adapter_config.json").read_text())
    assert config["smoothing"]["sigma"] == 0.12 and config["smoothing"]["num_samples"] == 3
    assert config["auto_mapping"] == {"base_model_class": "AutoModelForImageTextToText", "parent_library": "transformers"}


def test_booster_on_a_stock_mllm_restores_its_smoothing(booster_dir, caplog):
    reference = tiny_smoothed_model("llava", num_samples=3, seed=0, sigma=0.12)
    hfs.load_booster(reference, booster_dir)
    inputs = tiny_inputs(reference)
    expected = _logits(reference, inputs)
    stock = tiny_model("llava")
    with caplog.at_level(logging.WARNING):
        loaded = PeftModel.from_pretrained(stock, booster_dir)
    assert "now SmoothedLlavaForConditionalGeneration" in caplog.text and "σ=0.12" in caplog.text
    base = loaded.get_base_model()
    assert isinstance(base, hfs.SmoothedLlavaForConditionalGeneration)
    assert base.smoothing_config.sigma == 0.12 and base.config.model_type == "smoothed_llava"
    assert torch.equal(_logits(loaded, inputs), expected)  # the booster acts, under the smoothing it was made for


def test_booster_on_a_standalone_encoder_warns(tmp_path, caplog):
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          image_size=28, patch_size=14)
    peft_model = hfs.add_booster(Dinov2Model(config).eval())
    peft_model.save_pretrained(tmp_path / "adapter")
    with caplog.at_level(logging.WARNING):
        PeftModel.from_pretrained(Dinov2Model(config).eval(), tmp_path / "adapter")
    assert "identity in this model's own forward" in caplog.text and "SmoothedVisionTower" in caplog.text


def test_a_booster_trained_without_smoothing_is_restored_at_its_first_sigma(tmp_path, caplog):
    peft_model = hfs.add_booster(tiny_model("llava"), hfs.GSBConfig(sigmas=[0.5, 0.25]))
    peft_model.save_pretrained(tmp_path / "adapter")
    with caplog.at_level(logging.WARNING):
        loaded = PeftModel.from_pretrained(tiny_model("llava"), tmp_path / "adapter")
    assert loaded.get_base_model().smoothing_config.sigma == 0.5 and "records no smoothing" in caplog.text
    assert len(booster_layers(loaded)) == 1


_ADAPTER_METHODS = ("load_adapter", "add_adapter", "set_adapter", "enable_adapters", "disable_adapters",
                    "active_adapters", "get_adapter_state_dict", "delete_adapter")


@pytest.fixture
def no_transformers_adapter_integration(monkeypatch):
    """The package's own loading and saving go through PEFT's API, never through transformers' adapter methods,
    which from transformers 5.24 on require peft >= 0.22: they work with every supported transformers and peft."""
    from transformers.integrations.peft import PeftAdapterMixin

    def refuse(*args, **kwargs):
        raise AssertionError("transformers' adapter integration was used")

    for name in _ADAPTER_METHODS:
        monkeypatch.setattr(PeftAdapterMixin, name, refuse)


def test_transformers_load_adapter_gives_the_load_booster_model(booster_dir):
    """transformers' `model.load_adapter(booster)` gives the model `load_booster` gives: the recorded smoothing, the
    same weights and the same outputs up to float rounding (transformers leaves the weights at another memory
    alignment, where the CPU kernels round differently). Where the installed peft meets transformers' own minimum
    for its other adapter methods (peft >= 0.22 from transformers 5.24), `disable_adapters()` runs the plain smoothed
    model; below it, transformers refuses, naming the peft it needs: never a booster silently left on or off."""
    import peft
    from packaging.version import Version
    from transformers.integrations import peft as integration

    model = tiny_model("llava")
    model.load_adapter(str(booster_dir))
    reference = tiny_model("llava")
    hfs.load_booster(reference, booster_dir)
    assert isinstance(model, hfs.SmoothedLlavaForConditionalGeneration)
    assert model.smoothing_config.to_dict() | {"booster": None} == reference.smoothing_config.to_dict() | {"booster": None}
    ours, theirs = ({k: v for k, v in m.state_dict().items() if "fs_booster_" in k} for m in (model, reference))
    assert ours and ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    inputs = tiny_inputs(reference)
    boosted = _logits(reference, inputs)
    torch.testing.assert_close(_logits(model, inputs), boosted, rtol=1e-5, atol=1e-5)
    if Version(peft.__version__) < Version(integration.MIN_PEFT_VERSION):
        with pytest.raises(ValueError, match=f">= {integration.MIN_PEFT_VERSION}"):
            model.disable_adapters()
        return
    model.disable_adapters()
    plain = _logits(tiny_smoothed_model("llava", **{k: getattr(reference.smoothing_config, k)
                                                    for k in ("sigma", "num_samples", "seed")}), inputs)
    assert torch.equal(_logits(model, inputs), plain) and not torch.allclose(plain, boosted)


def test_boosters_load_save_and_reload_through_peft_only(booster_dir, tmp_path, no_transformers_adapter_integration):
    model = tiny_smoothed_model("llava", num_samples=3, seed=0, sigma=0.12)
    hfs.load_booster(model, booster_dir)
    assert model.smoothing_config.booster == str(booster_dir)
    assert all(not p.requires_grad for layer in booster_layers(model) for p in layer.adapter_parameters("default"))
    inputs = tiny_inputs(model)
    expected = _logits(model, inputs)
    model.save_pretrained(tmp_path / "full")
    reloaded = hfs.SmoothedLlavaForConditionalGeneration.from_pretrained(tmp_path / "full")
    assert torch.equal(_logits(reloaded, inputs), expected)  # full weights, booster included, bit-exact
    stock = tiny_model("llava")
    hfs.load_booster(stock, booster_dir)  # a stock model becomes its smoothed type, with the recorded smoothing
    assert torch.equal(_logits(stock, inputs), expected)
    with pytest.raises(ValueError, match="already holds an adapter named `default`"):
        hfs.load_booster(stock, booster_dir)


def test_a_standalone_encoder_booster_saves_as_its_adapter(tmp_path, no_transformers_adapter_integration):
    from transformers import Dinov2Config, Dinov2Model

    from hf_feature_smoothing.hub import save_certified

    config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          image_size=28, patch_size=14)
    peft_model = hfs.add_booster(Dinov2Model(config).eval())
    _randomise_booster(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    encoder = hfs.load_booster(Dinov2Model(config).eval(), tmp_path / "adapter")
    save_certified(encoder, tmp_path / "saved")  # the adapter, as transformers' adapter-only save writes it
    assert load_file(tmp_path / "saved" / FILE).keys() == load_file(tmp_path / "adapter" / FILE).keys()
    again = hfs.load_booster(Dinov2Model(config).eval(), tmp_path / "saved")
    ours, theirs = ({k: v for k, v in m.named_parameters() if "fs_booster_" in k} for m in (encoder, again))
    assert ours and ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
