"""An MLLM over a candidate answer set as a classifier: one forward scores every candidate, consistently with
teacher-forced decoding, and the classifier view is differentiable for attacks."""

import pytest
import torch

from hf_feature_smoothing.attacks.classifier import AnswerClassifier
from hf_feature_smoothing.models.answers import CandidateAnswers
from hf_feature_smoothing.smoothing.towers import ImageInputs
from hf_feature_smoothing.testing_utils import tiny_inputs, tiny_model, tiny_smoothed_model


CANDIDATES = CandidateAnswers(tuple((20, 21, 30 + k, 40) for k in range(4)), tuple(f"answer {k}" for k in range(4)))


def test_candidates_share_a_prefix_and_branch_at_one_token():
    assert CANDIDATES.branch == 2 and CANDIDATES.prefix == [20, 21] and CANDIDATES.branch_tokens == [30, 31, 32, 33]
    assert CANDIDATES.index([20, 21, 32, 40]) == 2 and CANDIDATES.index([20, 21]) is None
    assert len(CANDIDATES.digest()) == 16
    for bad in ([(1, 2), (1, 2)], [(1, 2)], [(1, 2), (1,)], [(), (1,)]):
        with pytest.raises(ValueError, match="candidate"):
            CandidateAnswers(tuple(bad), tuple(str(i) for i in range(len(bad))))
    assert CANDIDATES.single_branch and "branch-token logits" in CANDIDATES.base_classifier
    assert not MULTI.single_branch and "log-likelihood" in MULTI.base_classifier and MULTI.branch == 1


# "… is nominal." / "… has a local defect." / "… has a global defect.": no single token tells them apart
MULTI = CandidateAnswers(((20, 21, 30, 40), (20, 22, 31, 41, 42), (20, 22, 32, 41, 42)), ("is", "has a", "has b"))


@pytest.mark.parametrize("padded", [True, False])
def test_answers_that_branch_twice_are_scored_by_their_teacher_forced_log_likelihood(padded):
    """Prompts of one length share the prompt's key/value cache across candidates; prompts of different lengths run
    prompt + candidate for every pair: both give each candidate's teacher-forced log-likelihood."""
    model = tiny_model("llava")
    inputs = tiny_inputs(model, num_images=2)
    if padded:
        inputs["attention_mask"][1, :1] = 0  # prompts of different lengths: the second is one token shorter
    prefixed, positions = MULTI.with_prefix(inputs, pad_token_id=0)
    if not padded:
        with torch.no_grad():
            torch.testing.assert_close(MULTI._cached_log_likelihoods(model, prefixed, inputs["pixel_values"]),
                                       MULTI._repeated_log_likelihoods(model, prefixed, positions,
                                                                       ImageInputs(inputs["pixel_values"])), rtol=1e-4, atol=1e-4)
    pixels = inputs["pixel_values"].clone().requires_grad_(True)
    scores = MULTI.scores(model, prefixed, positions, pixels)
    scores[:, 1].sum().backward()  # differentiable in the pixels (attacks use it)
    assert scores.shape == (2, 3) and pixels.grad.abs().sum() > 0
    with torch.no_grad():
        for b in range(2):
            prompt = inputs["input_ids"][b][inputs["attention_mask"][b].bool()]
            for k, ids in enumerate(MULTI.token_ids):
                full = torch.cat([prompt, torch.tensor(ids)])[None]
                log_probs = model(input_ids=full, attention_mask=torch.ones_like(full),
                                  pixel_values=inputs["pixel_values"][b : b + 1]).logits[0].float().log_softmax(-1)
                start = len(prompt) + MULTI.branch
                expected = sum(log_probs[start + j - 1, ids[MULTI.branch + j]] for j in range(len(ids) - MULTI.branch))
                torch.testing.assert_close(scores[b, k], expected, rtol=1e-4, atol=1e-4)


def test_branch_scores_are_the_teacher_forced_logits_of_each_candidate():
    model = tiny_model("llava")
    inputs = tiny_inputs(model, num_images=2)
    prefixed, positions = CANDIDATES.with_prefix(inputs, pad_token_id=0)
    with torch.no_grad():
        scores = CANDIDATES.scores(model, prefixed, positions, inputs["pixel_values"])
        for k, ids in enumerate(CANDIDATES.token_ids):
            full = torch.cat([inputs["input_ids"], torch.tensor([ids] * 2)], dim=1)
            logits = model(input_ids=full, attention_mask=torch.ones_like(full),
                           pixel_values=inputs["pixel_values"]).logits
            at = inputs["input_ids"].shape[1] + CANDIDATES.branch - 1
            torch.testing.assert_close(scores[:, k], logits[:, at, ids[CANDIDATES.branch]].float())


@pytest.mark.parametrize("smoothed", [False, True])
def test_answer_classifier_maps_images_to_candidate_logits_with_gradients(smoothed):
    model = tiny_smoothed_model("llava", num_samples=2, seed=0) if smoothed else tiny_model("llava")
    inputs = tiny_inputs(model, num_images=1)
    classifier = AnswerClassifier(model, inputs, CANDIDATES)
    images = torch.rand(3, 3, *inputs["pixel_values"].shape[-2:], requires_grad=True)
    logits = classifier(images)
    assert logits.shape == (3, 4) and torch.isfinite(logits).all()
    (grad,) = torch.autograd.grad(logits[:, 0].sum(), images)
    assert grad.abs().sum() > 0
    with pytest.raises(ValueError, match="one prompt"):
        AnswerClassifier(model, tiny_inputs(model, num_images=2), CANDIDATES)



def _teacher_forced_logits(model, inputs: dict, answer: tuple[int, ...]) -> torch.Tensor:
    """Logits of one prompt (one image) followed by `answer`; token-aligned inputs are extended with 0 (mask: 1)."""
    extra = torch.tensor([answer])
    full = {key: torch.cat([value, extra if key == "input_ids" else torch.full_like(extra, int(key == "attention_mask"))],
                           dim=1)
            for key, value in inputs.items() if key not in ("pixel_values", "image_grid_thw")}
    return model(**full, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"]).logits[0].float()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_qwen_vl_answers_are_scored_with_their_grid_and_token_types(family):
    """Patch-flattened Qwen-VL inputs: the prefixed prompt keeps `mm_token_type_ids` (0 on the answer), and both scorings
    (branch-token logits; log-likelihoods, batched without a cache under M-RoPE) equal teacher-forced decoding of
    prompt + candidate, for several images (one per prompt) in one pass."""
    model = tiny_model(family)
    inputs = tiny_inputs(model)
    copies, rows = 2, len(inputs["pixel_values"])
    pixels = torch.cat([inputs["pixel_values"], inputs["pixel_values"].flip(0)])  # two different images
    grid = inputs["image_grid_thw"].repeat(copies, 1)
    for candidates in (CANDIDATES, MULTI):
        prefixed, positions = candidates.with_prefix(inputs, pad_token_id=0)
        assert set(prefixed) == {"input_ids", "attention_mask", "mm_token_type_ids"}
        assert prefixed["mm_token_type_ids"][0, -len(candidates.prefix):].eq(0).all()
        batch = {key: value.expand(copies, -1) for key, value in prefixed.items()}
        with torch.no_grad():
            scores = candidates.scores(model, batch, positions.expand(copies), pixels, grid)
            for b in range(copies):
                single = dict(inputs, pixel_values=pixels[b * rows : (b + 1) * rows])
                for k, ids in enumerate(candidates.token_ids):
                    logits = _teacher_forced_logits(model, single, ids)
                    start = inputs["input_ids"].shape[1] + candidates.branch  # the first distinct token
                    if candidates.single_branch:
                        expected = logits[start - 1, ids[candidates.branch]]
                    else:
                        log_probs = logits.log_softmax(-1)
                        expected = sum(log_probs[start + j - 1, ids[candidates.branch + j]]
                                       for j in range(len(ids) - candidates.branch))
                    torch.testing.assert_close(scores[b, k], expected, rtol=1e-4, atol=1e-4)
