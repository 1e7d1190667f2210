"""What 0.1.0 wrote still loads, unchanged: smoothed checkpoints with a booster (mapper; purifier + attention), their
generated cards, a booster adapter folder and a stand-alone smoothed tower, all written by
`tests/fixtures/make_release_fixtures.py` at commit 31b2e5c. Weights load bit-exact; outputs match what 0.1.0
computed from the same checkpoints (bit-exact under the transformers and torch versions and on the CPU that wrote
them, within float rounding of other kernels otherwise: the manifest of 0.1.0's fixtures names no CPU)."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
import transformers as tf
from huggingface_hub import ModelCard
from safetensors.torch import load_file

import hf_feature_smoothing as hfs

from .fixtures.make_release_fixtures import cpu_signature


RELEASE = Path(__file__).parent / "fixtures" / "release-0.1.0"
MANIFEST = json.loads((RELEASE / "manifest.json").read_text())
EXPECTED = load_file(RELEASE / "expected.safetensors")
INPUTS = {k.removeprefix("inputs."): v for k, v in EXPECTED.items() if k.startswith("inputs.")}


def _assert_same_output(actual: torch.Tensor, expected: torch.Tensor) -> None:
    same_kernels = (tf.__version__, torch.__version__, cpu_signature()) == (
        MANIFEST["transformers"], MANIFEST["torch"], MANIFEST.get("cpu"))
    if same_kernels:  # the versions and the machine that wrote them: bit-exact
        assert torch.equal(actual, expected)
    else:
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def _fingerprint(tensor: torch.Tensor) -> tuple:
    return tuple(tensor.shape), str(tensor.dtype), hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def _assert_weights_loaded_bit_exact(model: torch.nn.Module, weights_file: Path) -> None:
    """Every saved tensor is in the model unchanged (transformers renames legacy checkpoint keys on load, so tensors
    are matched by value, not by name)."""
    live = {_fingerprint(t) for t in model.state_dict().values()}
    missing = [k for k, t in load_file(weights_file).items() if _fingerprint(t) not in live]
    assert not missing, missing[:5]


def _logits(model) -> torch.Tensor:
    model.smoothed_vision_tower.manual_seed(0)
    with torch.no_grad():
        return model(**INPUTS).logits


@pytest.mark.parametrize("name", ["llava_mapper", "llava_purifier"])
def test_smoothed_checkpoints_of_0_1_0_load_bit_exact(name):
    model = tf.AutoModelForImageTextToText.from_pretrained(RELEASE / name)
    assert type(model) is hfs.SmoothedLlavaForConditionalGeneration
    assert model.smoothing_config.sigma == 0.25 and model.smoothing_config.num_samples == 3
    _assert_weights_loaded_bit_exact(model, RELEASE / name / "model.safetensors")
    _assert_same_output(_logits(model), EXPECTED[f"{name}.logits"])
    card = ModelCard.load(RELEASE / name / "README.md")
    assert "hf-feature-smoothing" in card.data.tags


def test_a_booster_adapter_of_0_1_0_loads_into_a_0_1_0_checkpoint():
    model = tf.AutoModelForImageTextToText.from_pretrained(
        RELEASE / "llava_mapper", smoothing={"booster": str(RELEASE / "booster_adapter")})
    adapter = load_file(RELEASE / "booster_adapter" / "adapter_model.safetensors")
    live = {k: v for k, v in model.state_dict().items() if "fs_booster_" in k}
    assert len(live) == len(adapter) and all(  # the adapter's weights, unchanged, under the model's names
        any(torch.equal(v, w) for w in adapter.values()) for v in live.values())
    _assert_same_output(_logits(model), EXPECTED["llava_mapper+booster_adapter.logits"])


def test_a_smoothed_tower_of_0_1_0_loads_bit_exact():
    tower = hfs.SmoothedVisionTower.from_pretrained(RELEASE / "dinov2_tower")
    assert tower.config.sigma == 0.2 and tower.config.image_mean == [0.3, 0.4, 0.5]
    _assert_weights_loaded_bit_exact(tower, RELEASE / "dinov2_tower" / "model.safetensors")
    _assert_weights_loaded_bit_exact(tower, RELEASE / "dinov2_tower" / "booster" / "adapter_model.safetensors")
    tower.manual_seed(0)
    with torch.no_grad():
        features = torch.stack(tower(EXPECTED["dinov2_tower.pixels"], num_samples=4))
    _assert_same_output(features, EXPECTED["dinov2_tower.features"])
