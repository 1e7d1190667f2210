import pytest
import torch

from hf_feature_smoothing import FeatureSmoothingConfig, ImageInputs, SmoothedVisionTower, get_tower_family
from hf_feature_smoothing.testing_utils import TINY_FAMILIES, tiny_inputs, tiny_model, tiny_smoothed_model


def _image_inputs(inputs: dict) -> ImageInputs:
    return ImageInputs(inputs["pixel_values"], inputs.get("image_grid_thw"))


def _site_inputs(model, inputs: dict, projected: bool = False) -> list[torch.Tensor]:
    """What the projector / merger (and Qwen3 deepstack mergers) actually receive in a full forward."""
    tower = getattr(model, "smoothed_vision_tower", None)
    adapter = tower.family if tower else get_tower_family(model, FeatureSmoothingConfig())
    seen, handles = [], []

    def record(features):
        if not adapter.capturing:  # skip the Monte Carlo capture passes, keep what flows downstream
            seen.append(features.detach().clone())

    for module in adapter.site_modules():
        if projected:
            handles.append(module.register_forward_hook(lambda m, a, out: record(out)))
        else:
            handles.append(module.register_forward_pre_hook(lambda m, a: record(a[0])))
    with torch.no_grad():
        model(**inputs)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_language_model_receives_smoothed_features(family):
    stock = tiny_model(family)
    smoothed = tiny_smoothed_model(family, sigma=0.25, num_samples=4, seed=0)
    inputs = tiny_inputs(stock)
    clean, noisy = _site_inputs(stock, inputs), _site_inputs(smoothed, inputs)
    assert len(clean) == len(noisy) == (3 if family == "qwen3_vl" else 1)  # deepstack sites too
    for a, b in zip(clean, noisy):
        assert a.shape == b.shape
        assert (a - b).abs().max() > 1e-3
    # the LM sees the change: logits differ
    with torch.no_grad():
        assert not torch.allclose(stock(**inputs).logits, smoothed(**inputs).logits)


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("projected", [False, True])
def test_vanishing_noise_reproduces_clean_features(family, projected):
    """σ → 0: every copy is the clean image, so direction × mean norm must give back the clean site features
    row for row (catches scrambled rows, e.g. Qwen2.5's window permutation or copies-major batching)."""
    stock = tiny_model(family)
    smoothed = tiny_smoothed_model(
        family, sigma=1e-7, num_samples=5, chunk_size=3, smoothed_features="projected" if projected else "vision"
    )
    inputs = tiny_inputs(stock, num_images=2)
    for a, b in zip(_site_inputs(stock, inputs, projected), _site_inputs(smoothed, inputs, projected)):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tower_sees_exactly_n_copies_in_bounded_chunks(family):
    n, chunk = 7, 4
    smoothed = tiny_smoothed_model(family, num_samples=n, chunk_size=chunk)
    inputs = tiny_inputs(smoothed, num_images=2)
    tower = smoothed.smoothed_vision_tower.family.tower()
    images_per_call = []
    rows_per_image = inputs["pixel_values"].shape[0] // 2

    def count(module, args, kwargs):
        pv = args[0] if args else kwargs.get("pixel_values", kwargs.get("hidden_states"))
        images_per_call.append(pv.shape[0] if family == "llava" else pv.shape[0] // rows_per_image)

    handle = tower.register_forward_pre_hook(count, with_kwargs=True, prepend=True)
    with torch.no_grad():
        smoothed(**inputs)
    handle.remove()
    assert sum(images_per_call) == n * 2
    assert max(images_per_call) <= chunk


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_qwen_noise_is_tied_across_temporal_copies(family):
    stock = tiny_model(family)
    tower = SmoothedVisionTower(stock, FeatureSmoothingConfig(sigma=0.5))
    inputs = _image_inputs(tiny_inputs(stock))
    noisy = tower.add_noise(inputs, copies=3)
    vision = stock.config.vision_config
    frames = noisy.pixel_values.view(-1, 3, vision.temporal_patch_size, vision.patch_size, vision.patch_size)
    assert noisy.image_grid_thw.shape[0] == 3
    torch.testing.assert_close(frames[:, :, 0], frames[:, :, 1], rtol=0, atol=0)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_noise_lives_in_pixel_space(family):
    """The noise, read back in [0, 1] pixel space, has std σ in every channel although pixel_values are normalised
    with per-channel std ≠ 1."""
    stock = tiny_model(family)
    sigma = 0.3
    tower = SmoothedVisionTower(stock, FeatureSmoothingConfig(sigma=sigma, seed=0))
    inputs = _image_inputs(tiny_inputs(stock))
    noisy = tower.add_noise(inputs, copies=64)
    adapter = tower.family
    delta = adapter.to_image(noisy) - adapter.to_image(inputs).repeat(64, *[1] * (adapter.to_image(inputs).ndim - 1))
    per_channel_std = delta.transpose(0, 1).flatten(1).std(dim=1)
    torch.testing.assert_close(per_channel_std, torch.full((3,), sigma), atol=0.01, rtol=0)


def test_standalone_forward_is_a_mean_of_unit_vectors():
    stock = tiny_model("llava")
    inputs = tiny_inputs(stock, num_images=3)
    tower = SmoothedVisionTower(stock, FeatureSmoothingConfig(sigma=0.5, seed=1))
    one = tower(inputs["pixel_values"], num_samples=1)
    many = tower(inputs["pixel_values"], num_samples=16)
    assert len(one) == 3
    for vector in one:
        torch.testing.assert_close(vector.norm(), torch.tensor(1.0))
    assert all(0 < v.norm() < 1 for v in many)


def test_seeded_smoothing_is_reproducible_and_removable():
    stock = tiny_model("llava")
    inputs = tiny_inputs(stock)
    runs = [tiny_smoothed_model("llava", seed=5, num_samples=3) for _ in range(2)]
    with torch.no_grad():
        a, b = (m(**inputs).logits for m in runs)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        runs[0].smoothed_vision_tower.remove()
        torch.testing.assert_close(runs[0](**inputs).logits, stock(**inputs).logits)


def test_unsupported_model_lists_supported_types():
    model = torch.nn.Linear(2, 2)
    model.config = type("C", (), {"model_type": "bert"})()
    with pytest.raises(ValueError, match=r"Unsupported vision tower: model type 'bert'.*'llava'.*'qwen3_vl'"):
        SmoothedVisionTower(model)


@pytest.mark.parametrize(
    "pixel_values, match",
    [
        (torch.full((1, 3, 56, 56), float("nan")), "NaN"),
        (torch.zeros(3, 56, 56), "4 dims"),
        (torch.zeros(0, 3, 56, 56), "empty"),
        (torch.zeros(1, 3, 56, 56, dtype=torch.long), "floating"),
    ],
)
def test_bad_pixel_values_are_rejected(pixel_values, match):
    tower = SmoothedVisionTower(tiny_model("llava"))
    with pytest.raises((ValueError, TypeError), match=match):
        tower(pixel_values)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_generate_end_to_end(family):
    model = tiny_smoothed_model(family, num_samples=3)
    inputs = tiny_inputs(model, num_images=1)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 4)


def test_qwen_preprocessing_matches_the_transformers_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from hf_feature_smoothing.assets import skimage_photos

    image = skimage_photos(("astronaut",))["astronaut"].resize((224, 224))
    adapter = get_tower_family(tiny_model("qwen2_vl"), FeatureSmoothingConfig())
    ours = adapter.preprocess([image])
    reference = Qwen2VLImageProcessorPil(min_pixels=224 * 224, max_pixels=224 * 224)(image, return_tensors="pt")
    torch.testing.assert_close(ours.image_grid_thw, reference["image_grid_thw"])
    torch.testing.assert_close(ours.pixel_values, reference["pixel_values"], atol=1e-5, rtol=0)


def test_one_seed_scheme_reproduces_every_stream():
    """`noise.derive_digest` / `derive_seed` is the one (seed, stream, ..., image) scheme: certification noise blocks,
    attack starts, training noise and augmentation keep the exact seeds of the hand-rolled versions they replace."""
    import hashlib
    import random

    from hf_feature_smoothing.smoothing.noise import SeededNoise, derive_digest, derive_seed

    def old(message: str) -> bytes:
        return hashlib.sha256(message.encode() + b"abc").digest()

    assert SeededNoise(7, b"abc", "selection")._block_seed(3) == 3545645875357644758 == (
        int.from_bytes(old("7|selection|3|")[:8], "little") & (2**63 - 1))
    assert derive_seed(7, "attack", "starts", fingerprint=b"abc") == 4958787460838128648 == (
        int.from_bytes(old("7|attack|starts|")[:8], "little") & (2**63 - 1))
    training = int.from_bytes(derive_digest(7, "gsb-train", 5, fingerprint=b"abc")[:8], "little") >> 1
    assert training == 7397147742274438874 == int.from_bytes(old("7|gsb-train|5|")[:8], "little") >> 1
    assert random.Random(derive_digest(7, 2, (20, 30), fingerprint=b"abc")).random() == (
        random.Random(old("7|2|(20, 30)|")).random())
