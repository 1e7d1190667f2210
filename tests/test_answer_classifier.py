"""An MLLM over a candidate answer set as a classifier: one forward scores every candidate, consistently with
teacher-forced decoding, and the classifier view is differentiable for attacks."""

import pytest
import torch

from hf_feature_smoothing.attacks.classifier import AnswerClassifier
from hf_feature_smoothing.models.answers import CandidateAnswers
from hf_feature_smoothing.testing_utils import tiny_inputs, tiny_model, tiny_smoothed_model


CANDIDATES = CandidateAnswers(tuple((20, 21, 30 + k, 40) for k in range(4)), tuple(f"answer {k}" for k in range(4)))


def test_candidates_share_a_prefix_and_branch_at_one_token():
    assert CANDIDATES.branch == 2 and CANDIDATES.prefix == [20, 21] and CANDIDATES.branch_tokens == [30, 31, 32, 33]
    assert CANDIDATES.index([20, 21, 32, 40]) == 2 and CANDIDATES.index([20, 21]) is None
    assert len(CANDIDATES.digest()) == 16
    for bad in ([(1, 2), (1, 2)], [(1, 2)], [(1, 2), (1,)], [(), (1,)]):
        with pytest.raises(ValueError, match="candidate"):
            CandidateAnswers(tuple(bad), tuple(str(i) for i in range(len(bad))))


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
