"""The real-weight `llava-dinov2-smollm2` (DINOv2-S/14 + SmolLM2-135M + the shipped projector): it assembles
offline, answers held-out questions, loads through the offline Hub path, and round-trips smoothed and bit-exact."""

import subprocess
import sys
import textwrap

import pytest
import torch

from .conftest import offline_env


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llava_folder():
    from hf_feature_smoothing.assets.llava_dinov2_smollm2 import llava_checkpoint

    return llava_checkpoint()


def test_shipped_projector_answers_held_out_digits(llava_folder):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from hf_feature_smoothing.assets.labelled_images import digit_examples
    from hf_feature_smoothing.assets.llava_dinov2_smollm2 import projector_metadata
    from hf_feature_smoothing.assets.projector_training import answer_accuracy

    model = LlavaForConditionalGeneration.from_pretrained(llava_folder).eval()
    processor = AutoProcessor.from_pretrained(llava_folder)
    examples = digit_examples("test")[::4]  # 100 of the 397 held-out digits
    result = answer_accuracy(model, processor, examples, batch_size=25, progress=False)
    assert result["accuracy"] >= 0.9, result
    assert projector_metadata()["held_out"]["digits_accuracy"] >= 0.9
    inputs = processor(images=[examples[0].image], text=[processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": examples[0].question}]}],
        add_generation_prompt=True)], return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    answer = processor.tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.strip() == examples[0].answer


CHILD = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    import hf_feature_smoothing as hfs
    from hf_feature_smoothing.assets.llava_dinov2_smollm2 import REPO_ID, install_in_hub_cache
    from hf_feature_smoothing.assets.labelled_images import digit_examples
    from hf_feature_smoothing.assets.projector_training import answer_accuracy

    install_in_hub_cache(sys.argv[1])
    smoothing = hfs.FeatureSmoothingConfig(sigma=0.12, num_samples=4, seed=0)
    model = hfs.SmoothedLlavaForConditionalGeneration.from_pretrained(REPO_ID, smoothing=smoothing)
    assert model.smoothing_config.image_mean == [0.485, 0.456, 0.406], model.smoothing_config
    model.save_pretrained(sys.argv[2])
    again = AutoModelForImageTextToText.from_pretrained(sys.argv[2])
    assert type(again) is type(model) and again.smoothing_config.sigma == 0.12
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    processor = AutoProcessor.from_pretrained(REPO_ID)
    examples = digit_examples("test")[:24]
    model.smoothed_vision_tower.manual_seed(0)
    first = answer_accuracy(model, processor, examples, batch_size=24, progress=False)
    again.smoothed_vision_tower.manual_seed(0)
    assert answer_accuracy(again, processor, examples, batch_size=24, progress=False) == first
    assert first["accuracy"] >= 0.75, first
    print("OK", first)
    """
)


def test_smoothed_llava_loads_offline_from_the_hub_cache_and_round_trips(llava_folder, tmp_path):
    env = offline_env(tmp_path / "hub")
    result = subprocess.run([sys.executable, "-c", CHILD, str(llava_folder), str(tmp_path / "smoothed")], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
