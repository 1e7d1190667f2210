"""The booster shipped for the real-weight `llava-dinov2-smollm2` (purifier + attention mapper, trained with the frozen
language model in the loop): it loads in one line through the offline Hub path, keeps the smoothed model answering
where plain smoothing fails, raises the Gaussian robustness score, round-trips bit-exact, and no attack beats its
certificate; its training refuses to mix recipes."""

import json
import subprocess
import sys
import textwrap
from dataclasses import asdict

import pytest
import torch

from hf_feature_smoothing.assets.llava_booster_training import (
    LLAVA_BOOSTER,
    RECORD_FILE,
    LlavaBoosterRecipe,
)
from hf_feature_smoothing.assets.training_folder import check_settings, last_checkpoint

from .conftest import assert_pgd_never_beats_the_certificate, offline_env


def test_stages_trained_with_another_recipe_are_refused(tmp_path):
    check_settings(tmp_path, asdict(LlavaBoosterRecipe()))
    check_settings(tmp_path, asdict(LlavaBoosterRecipe()))  # the same settings continue
    with pytest.raises(ValueError, match=r"lambda_lm: 1\.0 → 0\.5.*steps: 300 → 10"):
        check_settings(tmp_path, asdict(LlavaBoosterRecipe(steps=10, lambda_lm=0.5)))


def test_training_resumes_from_the_last_checkpoint_trainer_finished(tmp_path):
    """A kill while `Trainer` writes checkpoint-20 leaves it without `trainer_state.json` (written last): training
    resumes from checkpoint-10, never from half-saved weights."""
    assert last_checkpoint(tmp_path / "none") is None
    for step, complete in ((5, True), (10, True), (20, False)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-10"


def test_the_shipped_booster_records_how_it_was_trained():
    config = json.loads((LLAVA_BOOSTER / "adapter_config.json").read_text())
    record = json.loads((LLAVA_BOOSTER / RECORD_FILE).read_text())
    assert config["tower_family"] == "llava" and config["purifier"] and config["mapper_mixing"] == "attention"
    assert config["sigmas"] == record["recipe"]["sigmas"] and record["variant"] == "lm"
    assert config["smoothing"]["sigma"] == record["recipe"]["smoothing_sigma"]
    assert config["smoothing"]["image_mean"] == [0.485, 0.456, 0.406]  # DINOv2's statistics, not CLIP's
    assert [c["stage"] for c in record["cost"]] == ["purifier", "lm"]


CHILD = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    import hf_feature_smoothing as hfs
    from hf_feature_smoothing.assets.llava_booster_training import LLAVA_BOOSTER
    from hf_feature_smoothing.assets.llava_dinov2_smollm2 import REPO_ID, install_in_hub_cache
    from hf_feature_smoothing.assets.labelled_images import digit_examples
    from hf_feature_smoothing.assets.projector_training import answer_accuracy

    install_in_hub_cache(sys.argv[1])
    processor = AutoProcessor.from_pretrained(REPO_ID)
    examples = digit_examples("test")[::20]  # 20 held-out digits
    smoothing = {"sigma": 0.25, "num_samples": 4, "seed": 0}
    plain_smoothing = AutoModelForImageTextToText.from_pretrained(REPO_ID, smoothing=smoothing)
    boosted = AutoModelForImageTextToText.from_pretrained(REPO_ID, smoothing={**smoothing, "booster": str(LLAVA_BOOSTER)})
    without = answer_accuracy(plain_smoothing, processor, examples, progress=False)["accuracy"]
    with_booster = answer_accuracy(boosted, processor, examples, progress=False)["accuracy"]
    assert with_booster >= 0.8 and with_booster >= without + 0.4, (without, with_booster)
    scores = [[c.score for c in hfs.certify(m, [e.image for e in examples[:2]], epsilon=[0.1], n=16,
                                                 reference="clean", seed=0)] for m in (plain_smoothing, boosted)]
    assert all(b > a for a, b in zip(*scores)), scores
    boosted.save_pretrained(sys.argv[2])
    again = AutoModelForImageTextToText.from_pretrained(sys.argv[2])
    assert again.smoothing_config.booster_config["config"]["purifier"] and again.smoothing_config.sigma == 0.25
    a, b = boosted.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for model in (boosted, again):
        model.smoothed_vision_tower.manual_seed(0)
    inputs = processor(images=[examples[0].image], text=["<|im_start|>user\\n<image>\\nWhich digit is this?<|im_end|>\\n"],
                       return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(boosted(**inputs).logits, again(**inputs).logits)
    print("OK", without, with_booster, scores)
    """
)


@pytest.mark.slow
def test_shipped_booster_loads_offline_keeps_answers_raises_the_score_and_round_trips(tmp_path):
    from hf_feature_smoothing.assets.llava_dinov2_smollm2 import llava_checkpoint

    env = offline_env(tmp_path / "hub")
    result = subprocess.run([sys.executable, "-c", CHILD, str(llava_checkpoint()), str(tmp_path / "saved")], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


@pytest.mark.slow
def test_attacks_never_beat_the_certificate_of_the_shipped_booster_on_the_real_llava():
    from hf_feature_smoothing import FeatureSmoothingConfig, SmoothedLlavaForConditionalGeneration, certify
    from hf_feature_smoothing.assets.labelled_images import digit_examples
    from hf_feature_smoothing.assets.llava_dinov2_smollm2 import llava_checkpoint
    from hf_feature_smoothing.booster import booster_noise_level

    smoothing = FeatureSmoothingConfig(sigma=0.25, chunk_size=32, seed=0, booster=str(LLAVA_BOOSTER))
    model = SmoothedLlavaForConditionalGeneration.from_pretrained(llava_checkpoint(), smoothing=smoothing).eval()
    tower = model.smoothed_vision_tower
    inputs = tower.family.preprocess([digit_examples("test", limit=1)[0].image])
    with torch.no_grad(), booster_noise_level(tower.encoder, 0.0):
        stock = tower.family.encode(inputs)[-1].flatten()
    reference = tower.clean_unit_features(inputs)[-1]
    assert torch.nn.functional.cosine_similarity(reference, stock, dim=0) < 0.9999  # the booster acts
    epsilons = [0.05, 0.15]
    (certificate,) = certify(tower, inputs, epsilon=epsilons, n0=16, n=96, alpha=0.01, seed=0)
    assert_pgd_never_beats_the_certificate(tower, inputs, reference, epsilons, certificate, protocol_apgd_steps=5)


def test_a_second_trainer_of_the_same_folder_is_refused(tmp_path):
    from hf_feature_smoothing.assets.llava_booster_training import train_llava_booster
    from hf_feature_smoothing.runs import RunError
    from hf_feature_smoothing.runs.locking import RunLock

    with RunLock(tmp_path / "gsb"), pytest.raises(RunError, match="held by: pid"):
        train_llava_booster(tmp_path / "gsb", "lm")
    with pytest.raises(ValueError, match="variant"):
        train_llava_booster(tmp_path / "gsb", "everything")
