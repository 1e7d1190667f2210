"""Booster variants (pixel purifier, token-mixing mapper) on every MLLM family and stand-alone tower: identity at init
and at σ = 0, σ-conditioned, bit-exact round trips, noise before the purifier, images never mix, layouts."""

import json

import pytest
import torch
import transformers as tf
from peft import PeftModel
from transformers.vision_utils import get_vision_window_index

import hf_feature_smoothing as hfs
from hf_feature_smoothing import FeatureSmoothingConfig, GSBConfig, SmoothedVisionTower
from hf_feature_smoothing.booster import GSBPurifierLayer, booster_layers, booster_noise_level
from hf_feature_smoothing.booster.layout import batched_layout, flat_layout
from hf_feature_smoothing.booster.loading import remove_boosters
from hf_feature_smoothing.booster.purifier import frames_to_patches, patches_to_frames
from hf_feature_smoothing.smoothing.towers import ImageInputs
from hf_feature_smoothing.testing_utils import IMAGE_TOKEN_ID, TINY_FAMILIES, tiny_inputs, tiny_smoothed_model


ENCODERS = ("dinov2", "vit", "clip_vision_model", "siglip_vision_model")
DINOV2_LLAVA = "llava-dinov2-full"  # the real-weight LLaVA's layout: DINOv2 tower, CLS kept at the site
VARIANTS = {  # each round-trips through one of the two loaders
    "purifier+attention": ({"purifier": True, "mapper_mixing": "attention"}, "peft"),
    "conv": ({"mapper_mixing": "conv", "purifier": {"width": 8, "depth": 3, "scale": 1}}, "load_booster"),
}


def tiny_dinov2_llava() -> tf.PreTrainedModel:
    """A smoothed LLaVA with a DINOv2 tower that keeps its CLS token (`vision_feature_select_strategy="full"`)."""
    from hf_feature_smoothing.testing_utils import _text_config

    torch.manual_seed(0)
    vision = tf.Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                             patch_size=14, image_size=56)
    stock = tf.LlavaForConditionalGeneration(tf.LlavaConfig(
        vision_config=vision, text_config=tf.LlamaConfig(**_text_config("llava")), image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-2, vision_feature_select_strategy="full")).eval()
    cls = hfs.SMOOTHED_MODEL_CLASSES["llava"]
    model = cls(cls.config_class(**stock.config.to_dict(), feature_smoothing={"num_samples": 2, "seed": 0})).eval()
    model.load_state_dict(stock.state_dict())
    return model


def tiny_encoder(model_type: str, seed: int = 0) -> tf.PreTrainedModel:
    torch.manual_seed(seed)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=8,
                  image_size=32)
    config = {"dinov2": tf.Dinov2Config, "vit": tf.ViTConfig, "clip_vision_model": tf.CLIPVisionConfig,
              "siglip_vision_model": tf.SiglipVisionConfig}[model_type](**common)
    return tf.AutoModel.from_config(config).eval()


class Case:
    """A model of one kind plus a deterministic smoothed output: MLLM logits, or a tower's smoothed features."""

    def __init__(self, kind: str, num_images: int = 1):
        self.kind = kind
        if kind in TINY_FAMILIES:
            self.model = tiny_smoothed_model(kind, num_samples=2, seed=0)
            self.tower = self.model.smoothed_vision_tower
            self.inputs = tiny_inputs(self.model, num_images=num_images)
        elif kind == DINOV2_LLAVA:
            self.model = tiny_dinov2_llava()
            self.tower = self.model.smoothed_vision_tower
            ids = torch.tensor([[1, *[IMAGE_TOKEN_ID] * 17, 5, 6]] * num_images)  # CLS + 4×4 patches
            image = torch.rand(num_images, 3, 56, 56, generator=torch.Generator().manual_seed(0))
            self.inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                           "pixel_values": self.tower.family.from_image(image, ImageInputs(image))}
        else:
            self.model = tiny_encoder(kind)
            self.tower = SmoothedVisionTower(self.model, FeatureSmoothingConfig(num_samples=2, seed=0))
            image = torch.rand(num_images, 3, 32, 32, generator=torch.Generator().manual_seed(0))
            self.inputs = {"pixel_values": self.tower.family.from_image(image, ImageInputs(image))}
        self.model.requires_grad_(False)  # as PEFT leaves it (SigLIP's pooling attention takes a fast path then)

    def output(self) -> torch.Tensor:
        self.tower._generators.clear()
        with torch.no_grad():
            if "input_ids" in self.inputs:
                return self.model(**self.inputs).logits
            return torch.cat(self.tower(**self.inputs))

    def site(self, sigma: float) -> torch.Tensor:
        """Boosted site features of the clean images at noise level `sigma`."""
        images = {k: v for k, v in self.inputs.items() if k in ("pixel_values", "image_grid_thw")}
        adapter = self.tower.family
        with torch.no_grad(), booster_noise_level(self.model, sigma, adapter.image_mean, adapter.image_std):
            return adapter.encode(ImageInputs(images["pixel_values"], images.get("image_grid_thw")))[-1]


def _randomise(model, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        if "fs_booster_" in name:
            param.data = torch.randn(param.shape, generator=generator) * scale


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("kind", (*TINY_FAMILIES, DINOV2_LLAVA, *ENCODERS))
def test_variant_is_identity_at_init_and_zero_noise_sigma_conditioned_and_round_trips(kind, variant, tmp_path):
    config, loader = VARIANTS[variant]
    case = Case(kind)
    stock, stock_site = case.output(), case.site(0.25)
    booster = hfs.add_booster(case.model, GSBConfig(sigmas=[0.25], **config))
    kinds = {type(layer).__name__ for layer in booster_layers(case.model)}
    assert kinds == {"GSBMapperLayer", "GSBPurifierLayer"}
    assert torch.equal(case.output(), stock)  # untrained: exactly the stock model
    _randomise(booster)
    trained = case.output()
    assert not torch.allclose(trained, stock)
    assert torch.equal(case.site(0.0), stock_site)  # σ = 0: identity by construction, whatever the weights
    assert not torch.allclose(case.site(0.25), case.site(0.5))  # conditioned on σ

    booster.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["purifier_module"] in saved["target_modules"] and saved["mapper_mixing"] == config["mapper_mixing"]
    fresh = Case(kind)
    if loader == "peft":
        PeftModel.from_pretrained(fresh.model, tmp_path / "adapter")
    else:
        hfs.load_booster(fresh.model, tmp_path / "adapter")
    assert torch.equal(fresh.output(), trained)


@pytest.mark.parametrize("kind", ["llava", "qwen2_vl", "dinov2"])
def test_purifier_only_booster(kind, tmp_path):
    case = Case(kind)
    stock = case.output()
    booster = hfs.add_booster(case.model, GSBConfig(mapper=False, purifier=True))
    assert [type(layer).__name__ for layer in booster_layers(case.model)] == ["GSBPurifierLayer"]
    assert torch.equal(case.output(), stock)
    _randomise(booster)
    assert not torch.allclose(case.output(), stock)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen3_vl"])
def test_noise_is_added_before_the_purifier(family):
    """The purifier runs inside the tower call on the noisy image, for the model's own copy and the Monte Carlo copies
    alike: it is part of the certified base function."""
    sigma = 0.25
    model = tiny_smoothed_model(family, num_samples=4, seed=0, sigma=sigma)
    hfs.add_booster(model, GSBConfig(mapper=False, purifier=True))
    (layer,) = booster_layers(model)
    seen = []
    layer.register_forward_pre_hook(lambda m, args: seen.append((args[0].clone(), m.noise_level)))
    inputs = tiny_inputs(model)
    with torch.no_grad():
        model(**inputs)
    adapter = model.smoothed_vision_tower.family
    grid = inputs.get("image_grid_thw")
    clean = adapter.to_image(ImageInputs(inputs["pixel_values"], grid))
    assert [level for _, level in seen] == [sigma, sigma]  # copy #1 in the model's call, then copies 2..4
    noise = []
    for pixels, _ in seen:
        copies = pixels.shape[0] // inputs["pixel_values"].shape[0]
        repeated = ImageInputs(pixels, None if grid is None else grid.repeat(copies, 1))
        noise.append(adapter.to_image(repeated).view(copies, *clean.shape) - clean)
    noise = torch.cat(noise)
    assert noise.shape[0] == 4 and abs(noise.std().item() - sigma) < 0.02 and abs(noise.mean().item()) < 0.02
    # certification goes through the same path: noise first, then the tower (purifier inside)
    seen.clear()
    tower = SmoothedVisionTower(model, FeatureSmoothingConfig(sigma=sigma, chunk_size=2))
    list(tower.iter_unit_features(ImageInputs(inputs["pixel_values"], grid), 2))
    assert len(seen) == 1 and seen[0][1] == sigma and not torch.equal(seen[0][0][: len(inputs["pixel_values"])],
                                                                        inputs["pixel_values"])


def test_purifier_without_pixel_stats_fails_clearly():
    model = tiny_smoothed_model("llava")
    hfs.add_booster(model, GSBConfig(purifier=True))
    _randomise(model)
    with booster_noise_level(model, 0.25), pytest.raises(RuntimeError, match="image_mean / image_std"):
        model.smoothed_vision_tower.family.encode(ImageInputs(tiny_inputs(model)["pixel_values"]))


@pytest.mark.parametrize("mixing", ["attention", "conv"])
@pytest.mark.parametrize("kind", ["llava", DINOV2_LLAVA, "qwen2_5_vl", "dinov2"])
def test_tokens_of_two_images_never_mix(kind, mixing):
    case = Case(kind, num_images=2)
    hfs.add_booster(case.model, GSBConfig(mapper_mixing=mixing))
    _randomise(case.model, 0.2)
    before = case.site(0.25)
    pixels = case.inputs["pixel_values"].clone()
    half = pixels.shape[0] // 2
    pixels[half:] = pixels[half:].flip(0) + 0.5  # change the second image only
    case.inputs["pixel_values"] = pixels
    after = case.site(0.25)
    rows = before.shape[0] // 2
    assert torch.allclose(before[:rows], after[:rows], atol=1e-6)
    assert not torch.allclose(before[rows:], after[rows:], atol=1e-3)


def _positions(h: int, w: int) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([y, x], -1).float()  # (h, w, 2)


@pytest.mark.parametrize("windowed", [False, True])
def test_flat_layout_finds_the_patch_grid_in_merge_and_window_order(windowed):
    merge, grids = 2, torch.tensor([[1, 8, 12], [2, 4, 4]])
    rows, raster = [], []
    for t, h, w in grids.tolist():
        pos = _positions(h, w)[None].expand(t, h, w, 2) + torch.arange(t)[:, None, None, None] * 100
        raster.append(pos)
        rows.append(pos.reshape(t, h // merge, merge, w // merge, merge, 2).permute(0, 1, 3, 2, 4, 5).reshape(-1, 2))
    rows = torch.cat(rows)  # the processor's merge-window order
    order = None
    if windowed:  # Qwen2.5-VL's blocks (and merger input) run in window order
        order, _ = get_vision_window_index(grids, merge, window_size=56, patch_size=14)
        assert not torch.equal(order, torch.arange(len(order)))
        rows = rows.view(-1, merge * merge, 2)[order].flatten(0, 1)
    layout = flat_layout(grids, rows.shape[0], merge, order, torch.device("cpu"))
    assert sorted(tuple(g.shape[1:]) for g in layout.grids) == [(4, 4), (8, 12)]
    for index in layout.grids:
        expected = next(r for r in raster if r.shape[1:3] == index.shape[1:])
        assert torch.equal(rows[index], expected)
    assert sorted(s.shape for s in layout.segments) == [torch.Size([1, 32]), torch.Size([1, 96])]


def test_qwen25_merger_input_is_in_the_window_order_the_layout_assumes():
    model = tiny_smoothed_model("qwen2_5_vl")
    visual = model.model.visual
    captured = {}
    visual.patch_embed.register_forward_hook(lambda m, a, out: captured.update(embed=out))
    visual.blocks[0].register_forward_pre_hook(
        lambda m, a, kw: captured.update(block=a[0] if a else kw["hidden_states"]), with_kwargs=True)
    inputs = tiny_inputs(model)
    model.smoothed_vision_tower.remove()
    with torch.no_grad():
        visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    geometry = model.smoothed_vision_tower.family.booster_geometry()
    order = geometry.site_order(visual, inputs["image_grid_thw"])
    embed, block = captured["embed"], captured["block"]
    processor = flat_layout(inputs["image_grid_thw"], embed.shape[0], 2, None, embed.device)
    window = flat_layout(inputs["image_grid_thw"], block.shape[0], 2, order, block.device)
    assert torch.equal(block[window.grids[0]], embed[processor.grids[0]])


def test_batched_layout_skips_the_cls_token_and_rejects_pooled_sites():
    layout = batched_layout(torch.tensor([[1, 2, 3]] * 2), batch=2, length=7, device=torch.device("cpu"))
    assert layout.segments[0].tolist() == [list(range(7)), list(range(7, 14))]
    assert layout.grids[0].tolist() == [[[1, 2, 3], [4, 5, 6]], [[8, 9, 10], [11, 12, 13]]]
    with pytest.raises(ValueError, match="Token mixing needs every patch token"):
        batched_layout(torch.tensor([[1, 2, 3]]), batch=1, length=1, device=torch.device("cpu"))


def test_qwen_patch_rows_reassemble_into_the_image():
    model = tiny_smoothed_model("qwen2_vl")
    adapter = model.smoothed_vision_tower.family
    from PIL import Image

    picture = Image.fromarray((torch.rand(56, 56, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy())
    inputs = adapter.preprocess([picture, picture.transpose(0)], 56)
    geometry = adapter.booster_geometry()
    frames = patches_to_frames(inputs.pixel_values, inputs.image_grid_thw, geometry)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (adapter.image_mean, adapter.image_std))
    from hf_feature_smoothing.smoothing.towers.inputs import pil_to_tensor

    for frame, image in zip(frames, (picture, picture.transpose(0))):
        assert frame.shape == (2, 3, 56, 56)  # temporal_patch_size copies of the still image
        torch.testing.assert_close(frame * std + mean, pil_to_tensor(image).expand(2, 3, 56, 56))
    assert torch.equal(frames_to_patches(frames, inputs.image_grid_thw, geometry), inputs.pixel_values)


def test_invalid_configs_and_mismatched_purifier_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="neither a mapper nor a purifier"):
        GSBConfig(mapper=False)
    with pytest.raises(ValueError, match="`mapper_mixing`"):
        GSBConfig(mapper_mixing="mlp")
    with pytest.raises(ValueError, match="needs the mapper"):
        GSBConfig(mapper=False, purifier=True, mapper_mixing="conv")
    with pytest.raises(ValueError, match="Unknown `purifier` options"):
        GSBConfig(purifier={"channels": 4})
    with pytest.raises(ValueError, match="must be odd"):
        GSBConfig(mapper_mixing="conv", mixing_kernel_size=4)
    with pytest.raises(ValueError, match="`mixing_heads`=5 must divide"):
        hfs.add_booster(tiny_smoothed_model("llava"), GSBConfig(mapper_mixing="attention", mixing_heads=5))
    hfs.add_booster(tiny_smoothed_model("llava"), GSBConfig(purifier=True)).save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    config["purifier_module"] = "vision_tower.other_conv"
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="purifier wraps `vision_tower.other_conv`"):
        PeftModel.from_pretrained(tiny_smoothed_model("llava"), tmp_path / "a")


def _hook_counts(model) -> dict[str, tuple[int, int]]:
    return {name: (len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in model.named_modules()}


@pytest.mark.parametrize("kind, purifier", [("qwen2_vl", True), ("qwen2_5_vl", True), ("dinov2", False)])
def test_remove_boosters_leaves_no_hook_behind(kind, purifier, tmp_path):
    """`remove_boosters` (used when a load fails and when `smoothing={"booster": ...}` replaces a saved booster)
    unwraps like `unload()`: the token-grid probes' hooks go too, and the model is its stock self again. (On a
    stand-alone encoder the probe sits on the patch embedding, inside the purifier layer when there is one.)"""
    source = Case(kind)
    booster = hfs.add_booster(source.model, GSBConfig(purifier=purifier, mapper_mixing="conv"))
    _randomise(booster)
    booster.save_pretrained(tmp_path / "adapter")
    case = Case(kind)
    stock, hooks = case.output(), _hook_counts(case.model)
    hfs.load_booster(case.model, tmp_path / "adapter")
    assert any(layer.probe is not None and layer.probe.handles for layer in booster_layers(case.model))
    remove_boosters(case.model)
    assert not booster_layers(case.model) and not hasattr(case.model, "peft_config")
    assert _hook_counts(case.model) == hooks
    assert torch.equal(case.output(), stock)


def test_a_replaced_saved_booster_leaves_no_hook_behind(tmp_path):
    """A smoothed checkpoint with a token-mixing booster in its weights, loaded with another booster: the saved
    booster's probe hooks are gone, exactly as if the checkpoint had held no booster."""
    case = Case("qwen2_5_vl")
    case.model.save_pretrained(tmp_path / "plain")
    _randomise(hfs.add_booster(case.model, GSBConfig(purifier=True, mapper_mixing="conv")))
    case.model.save_pretrained(tmp_path / "boosted")
    other = hfs.add_booster(Case("qwen2_5_vl").model, GSBConfig())  # no probe
    _randomise(other)
    other.save_pretrained(tmp_path / "other")
    smoothing = {"booster": str(tmp_path / "other")}
    replaced = tf.AutoModelForImageTextToText.from_pretrained(tmp_path / "boosted", smoothing=smoothing)
    expected = tf.AutoModelForImageTextToText.from_pretrained(tmp_path / "plain", smoothing=smoothing)
    assert [type(layer).__name__ for layer in booster_layers(replaced)] == ["GSBMapperLayer"]
    assert _hook_counts(replaced) == _hook_counts(expected)


def test_unload_restores_the_stock_model_and_removes_probes():
    case = Case("qwen2_vl")
    stock = case.output()
    booster = hfs.add_booster(case.model, GSBConfig(purifier=True, mapper_mixing="conv"))
    _randomise(booster)
    visual = case.model.model.visual
    assert visual._forward_pre_hooks
    hooks = len(visual._forward_pre_hooks)
    booster.unload()
    assert not booster_layers(case.model) and len(visual._forward_pre_hooks) == hooks - 2
    assert torch.equal(case.output(), stock)
    assert isinstance(GSBPurifierLayer, type)
