"""The real-weight `llava-dinov2-smollm2` (DINOv2-S/14 + SmolLM2-135M + the shipped projector): it assembles
offline, answers held-out questions, loads through the offline Hub path, and round-trips smoothed and bit-exact."""

import math
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
    examples = digit_examples("test")[::10]  # 40 of the 397 held-out digits
    result = answer_accuracy(model, processor, examples, batch_size=20, progress=False)
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
    from hf_feature_smoothing.assets.llava_dinov2_smollm2 import REPO_ID, install_in_hub_cache, prompt_text
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
    first = answer_accuracy(model, processor, examples, batch_size=24, progress=False)
    assert first["accuracy"] >= 0.75, first
    inputs = processor(images=[e.image for e in examples[:2]], text=[prompt_text(e.question) for e in examples[:2]],
                       return_tensors="pt")
    for smoothed in (model, again):  # the same noise, the same answers: smoothing round-trips with the weights
        smoothed.smoothed_vision_tower.manual_seed(0)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, again(**inputs).logits)
    print("OK", first)
    """
)


def test_smoothed_llava_loads_offline_from_the_hub_cache_and_round_trips(llava_folder, tmp_path):
    env = offline_env(tmp_path / "hub")
    result = subprocess.run([sys.executable, "-c", CHILD, str(llava_folder), str(tmp_path / "smoothed")], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_certify_answer_cli_certifies_and_reports_answer_accuracy(tmp_path):
    """`hf-fs certify-answer` on the real LLaVA with the shipped booster: rows carry every parameter (resuming and
    refusing other parameters is the run file's, tested with `certify`), and `hf-fs report` gives certified answer
    accuracy per radius in `model-index` with σ, n, α, the method and the candidate set."""
    import yaml

    from hf_feature_smoothing.cli import main
    from hf_feature_smoothing.runs import read_run

    output = tmp_path / "answers.jsonl"
    command = ["certify-answer", "--booster", "llava-dinov2-smollm2-gsb", "--sigma", "0.5", "--images", "digits:test",
               "--limit", "2", "--n0", "4", "--n", "12", "--alpha", "0.1", "--seed", "0", "--output", str(output)]
    assert main(command) == 0
    rows = read_run(output).rows
    assert [r["key"] for r in rows] == ["digits/1400", "digits/1401"]
    for row in rows:
        assert row["candidates"][row["label"]] == f"The digit is {row['label']}."
        assert row["sigma"] == 0.5 and row["n0"] == 4 and row["n"] == 12 and row["seed"] == 0
        assert row["booster_digest"] and row["prompt_digest"] and sum(row["counts"]) == 4
        assert row["correct"] == (row["answer"] == row["label"])
    assert main(["report", str(output), "--output-dir", str(tmp_path / "report")]) == 0
    (entry,) = yaml.safe_load((tmp_path / "report" / "model-index.yaml").read_text())["model-index"]
    metrics = {m["name"]: m for result in entry["results"] for m in result["metrics"]}
    assert {result["task"]["type"] for result in entry["results"]} == {"visual-question-answering"}
    digests = f"answers {rows[0]['candidates_digest'][:8]}, booster {rows[0]['booster_digest'][:8]}"
    summary = (tmp_path / "report" / "summary.md").read_text()  # the run's title names booster and candidates
    assert f"certify-answer llava-dinov2-smollm2 + llava-dinov2-smollm2-gsb vote, answers {digests[8:16]} σ=0.5" in summary
    metric = metrics[f"certified answer accuracy @ r=0.5 (σ=0.5, vote, {digests})"]
    assert metric["value"] == sum(r["correct"] and r["radius"] >= 0.5 for r in rows) / 2  # certified to r
    assert {k: metric["args"][k] for k in ("sigma", "n", "n0", "alpha", "method", "candidates_digest", "radius")} == {
        "sigma": 0.5, "n": 12, "n0": 4, "alpha": 0.1, "method": "vote", "candidates_digest": rows[0]["candidates_digest"],
        "radius": 0.5}
    assert metric["args"]["candidates"] == rows[0]["candidates"]
    # --dtype: the forward passes run (and the rows say they ran) in bf16 where the hardware has it, else refused
    from hf_feature_smoothing.utils.hardware import bf16_supported

    bf16 = [*command[:-1], str(tmp_path / "bf16.jsonl"), "--limit", "1", "--dtype", "bfloat16", "--device", "cpu"]
    assert main(bf16) == (0 if bf16_supported("cpu") else 2)
    if bf16_supported("cpu"):
        run = read_run(tmp_path / "bf16.jsonl")
        assert run.header["params"]["dtype"] == "bfloat16" and [r["dtype"] for r in run.rows] == ["bfloat16"]
        assert [r["dtype"] for r in rows] == ["float32", "float32"] and "dtype" not in read_run(output).header["params"]


def test_eot_apgd_within_a_certified_answer_radius_never_changes_the_majority_answer():
    """The answer certificate holds against the protocol's attack: on the real LLaVA + shipped booster at σ = 0.5,
    APGD (ℓ2, EOT over 4 noise draws per step) within a quarter of the certified radius R, aimed at the certified
    answer, cannot push its probability below what the certificate guarantees there, p ≥ Φ(Φ⁻¹(p̲_A) − ε/σ) (> ½,
    so the majority answer stays): a one-sided binomial test at level 0.001 on 40 fresh votes, which a lost majority
    (p ≤ ½) fails with probability ≥ 0.9 (checked)."""
    from transformers import AutoProcessor

    from hf_feature_smoothing import CandidateAnswers, FeatureSmoothingConfig, SmoothedLlavaForConditionalGeneration
    from hf_feature_smoothing.assets.labelled_images import digit_answer, digit_examples
    from hf_feature_smoothing.assets.llava_booster_training import LLAVA_BOOSTER
    from hf_feature_smoothing.assets.llava_dinov2_smollm2 import llava_checkpoint, prompt_text
    from hf_feature_smoothing.attacks.classifier import AnswerClassifier, classifier_attack
    from hf_feature_smoothing.models.answer_certificates import certify_answer
    from hf_feature_smoothing.smoothing.towers import ImageInputs
    from hf_feature_smoothing.statistics.bounds import normal_cdf, normal_ppf

    smoothing = FeatureSmoothingConfig(sigma=0.5, num_samples=1, seed=0, booster=str(LLAVA_BOOSTER))
    model = SmoothedLlavaForConditionalGeneration.from_pretrained(llava_checkpoint(), smoothing=smoothing).eval()
    processor = AutoProcessor.from_pretrained(llava_checkpoint())
    candidates = CandidateAnswers.from_texts(processor.tokenizer, [digit_answer(k) for k in range(10)])
    example = digit_examples("test", limit=3)[2]  # a digit the booster answers in nearly every noisy copy
    inputs = processor(images=[example.image], text=[prompt_text(example.question)], return_tensors="pt")
    inputs = {key: inputs[key] for key in ("input_ids", "attention_mask", "pixel_values")}
    pad = processor.tokenizer.pad_token_id
    certificate = certify_answer(model, inputs, candidates, n0=8, n=40, alpha=0.05, seed=0, pad_token_id=pad)
    assert certificate.answer == example.label and certificate.radius > 0.3, certificate  # something to attack
    epsilon = certificate.radius / 4
    guaranteed = normal_cdf(normal_ppf(certificate.p_lower) - epsilon / certificate.sigma)
    classifier = AnswerClassifier(model, inputs, candidates, pad_token_id=pad)
    image = model.smoothed_vision_tower.family.to_image(ImageInputs(inputs["pixel_values"]))
    label = torch.tensor([certificate.answer])
    attack = classifier_attack(classifier, image, label, epsilon, norm="l2", steps=4, eot_samples=4,
                               stop_at_success=False, generator=torch.Generator().manual_seed(0))
    assert attack.delta.flatten().norm() <= epsilon + 1e-4
    with torch.no_grad():
        votes = torch.cat([classifier((image + attack.delta).expand(8, -1, -1, -1)).argmax(-1) for _ in range(5)])
    hits, runs = int((votes == certificate.answer).sum()), len(votes)

    def at_most(count: int, p: float) -> float:
        return sum(math.comb(runs, k) * p**k * (1 - p) ** (runs - k) for k in range(count + 1))

    refuted = [count for count in range(runs + 1) if at_most(count, guaranteed) <= 1e-3]  # the attack beat it
    assert sum(math.comb(runs, count) for count in refuted) / 2**runs >= 0.9, guaranteed  # a lost majority is seen
    assert hits not in refuted, (hits, runs, guaranteed)
