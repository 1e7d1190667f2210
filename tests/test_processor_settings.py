"""The checkpoint's own processor: statistics from `processor_config.json` (transformers 5) or
`preprocessor_config.json`, never silently the family default; PIL images on the processor's own pixel grid."""

import json
import logging

import torch
from PIL import Image

import hf_feature_smoothing as hfs
from hf_feature_smoothing.smoothing.towers.processor import read_processor_settings
from hf_feature_smoothing.testing_utils import tiny_model


def _photo(width: int = 93, height: int = 70) -> Image.Image:
    generator = torch.Generator().manual_seed(0)
    pixels = (torch.rand(height // 7, width // 7, 3, generator=generator) * 255).to(torch.uint8)
    return Image.fromarray(pixels.numpy()).resize((width, height), Image.Resampling.BILINEAR)  # smooth-ish


def _llava_processor(**image_kwargs):
    from tokenizers import Tokenizer, models
    from transformers import LlavaProcessor, PreTrainedTokenizerFast
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "<image>": 1},
                                                                                    unk_token="<unk>")))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return LlavaProcessor(image_processor=CLIPImageProcessorPil(**image_kwargs), tokenizer=tokenizer, patch_size=14)


GEOMETRY = dict(image_mean=[0.1, 0.2, 0.3], image_std=[0.3, 0.25, 0.2], size={"shortest_edge": 64},
                crop_size={"height": 56, "width": 56})


def test_transformers5_processor_config_is_read_and_logged(tmp_path, caplog):
    tiny_model("llava").save_pretrained(tmp_path / "stock")
    processor = _llava_processor(**GEOMETRY)
    processor.save_pretrained(tmp_path / "stock")
    assert not (tmp_path / "stock" / "preprocessor_config.json").exists()  # transformers 5 nests it
    with caplog.at_level(logging.INFO, logger="hf_feature_smoothing"):
        model = hfs.SmoothedLlavaForConditionalGeneration.from_pretrained(tmp_path / "stock", smoothing={"sigma": 0.2})
    assert model.smoothing_config.image_mean == [0.1, 0.2, 0.3] and model.smoothing_config.image_std == [0.3, 0.25, 0.2]
    assert "processor_config.json" in caplog.text and "image_mean=[0.1, 0.2, 0.3]" in caplog.text
    # PIL images are processed on the processor's own grid: resize the short side to 64, centre-crop 56
    image = _photo()
    ours = model.smoothed_vision_tower.family.preprocess([image])
    reference = processor.image_processor(image, return_tensors="pt")["pixel_values"]
    assert ours.pixel_values.shape == reference.shape == (1, 3, 56, 56)
    torch.testing.assert_close(ours.pixel_values, reference, atol=1e-5, rtol=0)
    explicit = model.smoothed_vision_tower.family.preprocess([image], image_size=28)  # an explicit size wins
    assert explicit.pixel_values.shape == (1, 3, 28, 28)


def test_a_padding_llava_processor_is_followed_pad_first(tmp_path):
    """LLaVA's `do_pad` pads to a centred square in the mean colour before the resize: read from the checkpoint
    and applied, PIL images land on the processor's own pixels (a processor that does not pad records no `do_pad`)."""
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    tiny_model("llava").save_pretrained(tmp_path / "stock")
    image_processor = LlavaImageProcessorPil(do_pad=True, **GEOMETRY)
    processor = _llava_processor(**GEOMETRY)
    processor.image_processor = image_processor
    processor.save_pretrained(tmp_path / "stock")
    model = hfs.SmoothedLlavaForConditionalGeneration.from_pretrained(tmp_path / "stock")
    assert model.smoothing_config.image_processor["do_pad"] is True
    for image in (_photo(), _photo(70, 93)):  # wide and tall
        ours = model.smoothed_vision_tower.family.preprocess([image]).pixel_values
        reference = image_processor(image, return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    _llava_processor(**GEOMETRY).save_pretrained(tmp_path / "no-pad")
    assert "do_pad" not in read_processor_settings(tmp_path / "no-pad")["image_processor"]


def test_legacy_preprocessor_config_and_priority(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    legacy = read_processor_settings(folder)
    assert legacy["image_mean"] == [0.5] * 3 and legacy["source"].endswith("preprocessor_config.json")
    (folder / "processor_config.json").write_text(json.dumps({"image_processor": {"image_mean": [0.1] * 3,
                                                                                  "image_std": [0.2] * 3}}))
    assert read_processor_settings(folder)["image_mean"] == [0.1] * 3  # what transformers 5 writes comes first
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": "x"}))  # no image processor in it
    assert read_processor_settings(folder)["image_mean"] == [0.5] * 3


def test_missing_statistics_warn_and_are_recorded(tmp_path, caplog):
    tiny_model("qwen2_vl").save_pretrained(tmp_path / "stock")
    with caplog.at_level(logging.WARNING):
        model = hfs.SmoothedQwen2VLForConditionalGeneration.from_pretrained(tmp_path / "stock", smoothing={})
    assert "no `image_mean` / `image_std`" in caplog.text and "`qwen2_vl` family default" in caplog.text
    assert model.smoothing_config.image_mean == [0.48145466, 0.4578275, 0.40821073]  # explicit in the config


def test_qwen_images_use_the_processor_grid(tmp_path):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tiny_model("qwen2_vl").save_pretrained(tmp_path / "stock")
    processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112},
                                         image_mean=[0.2, 0.3, 0.4], image_std=[0.5, 0.4, 0.3])
    processor.save_pretrained(tmp_path / "stock")
    model = hfs.SmoothedQwen2VLForConditionalGeneration.from_pretrained(tmp_path / "stock", smoothing={})
    image = _photo(width=200, height=120)
    ours = model.smoothed_vision_tower.family.preprocess([image])
    reference = processor(image, return_tensors="pt")
    assert reference["image_grid_thw"].tolist()[0][1] != reference["image_grid_thw"].tolist()[0][2]  # not square
    torch.testing.assert_close(ours.image_grid_thw, reference["image_grid_thw"])
    torch.testing.assert_close(ours.pixel_values, reference["pixel_values"], atol=1e-5, rtol=0)
    certificate = hfs.certify(model, [image], epsilon=[0.1], n=8, n0=4, alpha=0.1, seed=0)[0]
    assert certificate.sigma == model.smoothing_config.sigma
    _, grid_h, grid_w = reference["image_grid_thw"].tolist()[0]
    patch = model.config.vision_config.patch_size
    assert certificate.resolution == [grid_h * patch, grid_w * patch]  # pixels of the processed image, not one patch


def test_qwen_image_size_off_the_merge_grid_is_cropped_with_a_warning(caplog):
    """Qwen-VL crops `image_size` to whole merge windows: the size certified is said, not silently changed."""
    model = tiny_model("qwen2_vl")
    tower = hfs.SmoothedVisionTower(model, hfs.FeatureSmoothingConfig(sigma=0.25))
    unit = model.config.vision_config.patch_size * model.config.vision_config.spatial_merge_size
    asked = 3 * unit + 1
    with caplog.at_level(logging.WARNING):
        inputs = tower.family.preprocess([_photo(width=90, height=70)], image_size=asked)
    _, grid_h, grid_w = inputs.image_grid_thw.tolist()[0]
    patch = model.config.vision_config.patch_size
    assert [grid_h * patch, grid_w * patch] == [3 * unit, 3 * unit]
    assert f"`image_size`={asked}" in caplog.text and f"{3 * unit}×{3 * unit}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        tower.family.preprocess([_photo(width=90, height=70)], image_size=2 * unit)  # on the grid: nothing to say
    assert "`image_size`" not in caplog.text
