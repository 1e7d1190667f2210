"""`SmoothedVisionTower.from_pretrained` / `save_pretrained` for stand-alone encoders and MLLM towers."""

import json

import pytest
import torch
import transformers as tf

import hf_feature_smoothing as hfs
from hf_feature_smoothing.booster import booster_layers
from hf_feature_smoothing.testing_utils import tiny_inputs, tiny_model


TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28,
            patch_size=14)
ENCODERS = {
    "dinov2": (tf.Dinov2Config, tf.Dinov2Model, "preprocessor_config.json"),
    "vit": (tf.ViTConfig, tf.ViTModel, "processor_config.json"),
    "clip_vision_model": (tf.CLIPVisionConfig, tf.CLIPVisionModel, "preprocessor_config.json"),
    "siglip_vision_model": (tf.SiglipVisionConfig, tf.SiglipVisionModel, "processor_config.json"),
}
STATS = {"image_mean": [0.3, 0.4, 0.5], "image_std": [0.2, 0.25, 0.3]}


def _encoder_dir(tmp_path, model_type: str):
    config_cls, model_cls, processor_file = ENCODERS[model_type]
    torch.manual_seed(0)
    model_cls(config_cls(**TINY)).eval().save_pretrained(tmp_path / model_type)
    processor = {**STATS, "size": {"height": 28, "width": 28}, "resample": 2}
    data = {"image_processor": processor} if processor_file == "processor_config.json" else processor
    (tmp_path / model_type / processor_file).write_text(json.dumps(data))
    return tmp_path / model_type


def _features(tower, pixel_values) -> torch.Tensor:
    tower.manual_seed(0)
    with torch.no_grad():
        return torch.stack(tower(pixel_values, num_samples=4))


@pytest.mark.parametrize("model_type", list(ENCODERS))
def test_standalone_encoder_round_trip_is_bit_exact(model_type, tmp_path):
    tower = hfs.SmoothedVisionTower.from_pretrained(_encoder_dir(tmp_path, model_type),
                                                    smoothing={"sigma": 0.2, "chunk_size": 3})
    assert tower.config.image_mean == STATS["image_mean"] and tower.config.image_std == STATS["image_std"]
    assert tower.config.image_processor["size"] == {"height": 28, "width": 28}  # read with the statistics
    pixels = torch.randn(2, 3, 28, 28)
    expected = _features(tower, pixels)
    tower.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "feature_smoothing.json").read_text())["sigma"] == 0.2
    assert "feature_smoothing" not in json.loads((tmp_path / "saved" / "config.json").read_text())  # stock config
    again = hfs.SmoothedVisionTower.from_pretrained(tmp_path / "saved")
    assert again.config == tower.config and type(again.encoder) is type(tower.encoder)
    assert torch.equal(_features(again, pixels), expected)
    override = hfs.SmoothedVisionTower.from_pretrained(tmp_path / "saved", smoothing={"sigma": 0.5})
    assert override.config.sigma == 0.5 and override.config.chunk_size == 3


def test_standalone_encoder_with_booster_round_trip(tmp_path):
    folder = _encoder_dir(tmp_path, "dinov2")
    tower = hfs.SmoothedVisionTower.from_pretrained(folder, smoothing={"sigma": 0.25})
    peft_model = hfs.add_booster(tower.encoder)
    generator = torch.Generator().manual_seed(0)
    for name, param in peft_model.named_parameters():
        if "fs_booster_" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.05
    boosted = hfs.SmoothedVisionTower(peft_model, tower.config)
    pixels = torch.randn(1, 3, 28, 28)
    expected = _features(boosted, pixels)
    assert not torch.equal(expected, _features(hfs.SmoothedVisionTower.from_pretrained(folder, smoothing={"sigma": 0.25}),
                                               pixels))
    boosted.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "booster" / "adapter_model.safetensors").exists()
    again = hfs.SmoothedVisionTower.from_pretrained(tmp_path / "saved")
    assert torch.equal(_features(again, pixels), expected)
    # saved again without its booster, through a symlink: the link stays, the old booster/ folder does not
    (tmp_path / "latest").symlink_to(tmp_path / "saved")
    hfs.SmoothedVisionTower.from_pretrained(folder, smoothing={"sigma": 0.25}).save_pretrained(tmp_path / "latest")
    assert (tmp_path / "latest").is_symlink() and not (tmp_path / "saved" / "booster").exists()
    plain = hfs.SmoothedVisionTower.from_pretrained(tmp_path / "latest")
    assert plain.config.booster_config is None and not booster_layers(plain.encoder)


@pytest.mark.parametrize("config", [
    dict(purifier={"width": 8, "depth": 2}),
    dict(mapper=False, purifier={"width": 8, "depth": 2}),  # a purifier alone is a booster too
    dict(mapper_mixing="attention", mixing_heads=2, purifier={"width": 8, "depth": 2, "scale": 1}),
], ids=["purifier+mapper", "purifier-only", "purifier+attention"])
def test_standalone_encoder_with_purifier_booster_round_trip(config, tmp_path):
    """Every part of the booster is saved (not only the mapper) and reloads bit-exact."""
    folder = _encoder_dir(tmp_path, "dinov2")
    tower = hfs.SmoothedVisionTower.from_pretrained(folder, smoothing={"sigma": 0.25})
    peft_model = hfs.add_booster(tower.encoder, hfs.GSBConfig(hidden_dim=16, **config))
    generator = torch.Generator().manual_seed(0)
    parts = set()
    for name, param in peft_model.named_parameters():
        if "fs_booster_" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.05
            parts.add(name.split("fs_booster_")[1].partition(".")[0])
    assert "purifier" in parts
    boosted = hfs.SmoothedVisionTower(peft_model, tower.config)
    pixels = torch.randn(1, 3, 28, 28)
    expected = _features(boosted, pixels)
    boosted.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "booster" / "adapter_config.json").read_text())
    assert saved["purifier"] and saved["mapper"] == config.get("mapper", True)
    again = hfs.SmoothedVisionTower.from_pretrained(tmp_path / "saved")
    reloaded = {name.split("fs_booster_")[1].partition(".")[0] for name, _ in again.encoder.named_parameters()
                if "fs_booster_" in name}
    assert reloaded == parts
    assert torch.equal(_features(again, pixels), expected)


def test_mllm_repo_gives_its_smoothed_tower(tmp_path):
    tiny_model("llava").save_pretrained(tmp_path / "stock")
    tower = hfs.SmoothedVisionTower.from_pretrained(tmp_path / "stock", smoothing={"sigma": 0.3, "seed": 1})
    assert isinstance(tower.encoder, hfs.SmoothedLlavaForConditionalGeneration)
    assert tower.config is tower.encoder.smoothing_config
    pixels = tiny_inputs(tower.encoder)["pixel_values"]
    expected = _features(tower, pixels)
    tower.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["model_type"] == "smoothed_llava"
    again = hfs.SmoothedVisionTower.from_pretrained(tmp_path / "saved")
    assert again.config.sigma == 0.3 and torch.equal(_features(again, pixels), expected)


def test_unsupported_checkpoint_is_named(tmp_path):
    tf.BertModel(tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="`bert` checkpoint.*supports"):
        hfs.SmoothedVisionTower.from_pretrained(tmp_path / "bert")
