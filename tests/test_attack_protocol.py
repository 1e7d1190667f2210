"""The machinery of the attack protocol (benchmarks/llava_protocol.py): transfer perturbations measured as given,
the classifier view attacked by the project's APGD as hard as by the reference AutoAttack code, and the intervals."""

import pytest
import torch

from hf_feature_smoothing.attacks.classifier import AnswerClassifier, classifier_attack, majority_predictions
from hf_feature_smoothing.attacks.protocol import image_states, parse_budget, protocol_cells
from hf_feature_smoothing.attacks.text import answer_attack, pixel_adapter
from hf_feature_smoothing.models.answers import CandidateAnswers
from hf_feature_smoothing.smoothing.towers import ImageInputs
from hf_feature_smoothing.statistics.aggregates import wilson_interval
from hf_feature_smoothing.testing_utils import tiny_inputs, tiny_model


CANDIDATES = CandidateAnswers(tuple((20, 30 + k) for k in range(5)), tuple(f"answer {k}" for k in range(5)))


def _batch(model, size=2):
    inputs = tiny_inputs(model, num_images=size)
    return {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values")}


def test_a_transferred_perturbation_is_measured_as_given_and_must_lie_in_the_ball():
    model = tiny_model("llava")
    inputs, reference = _batch(model), [[11, 12], [13]]
    attacked = answer_attack(model, inputs, reference, 16 / 255, steps=3, eval_runs=1,
                             generator=torch.Generator().manual_seed(0))
    delta = torch.stack([r.delta for r in attacked])
    measured = answer_attack(model, inputs, reference, 16 / 255, steps=1, eval_runs=1, delta=delta)
    for found, again in zip(attacked, measured):
        assert again.loss == pytest.approx(found.loss, rel=1e-4) and again.accuracy == found.accuracy
        assert again.evaluations == 0 and again.first_success == -1
    with pytest.raises(ValueError, match="ball"):
        answer_attack(model, inputs, reference, 4 / 255, steps=1, eval_runs=1, delta=delta)
    with pytest.raises(ValueError, match="shape"):
        answer_attack(model, inputs, reference, 16 / 255, steps=1, eval_runs=1, delta=delta[:1])


def _classifier_problem(samples=8):
    model = tiny_model("llava")
    prompt = tiny_inputs(model, num_images=1)
    classifier = AnswerClassifier(model, prompt, CANDIDATES)
    generator = torch.Generator().manual_seed(3)
    like = prompt["pixel_values"]
    images = torch.rand(samples, *like.shape[1:], generator=generator)
    with torch.no_grad():
        labels = classifier(images).argmax(-1)  # clean predictions: every image starts correct
    return classifier, images, labels


def test_project_apgd_on_the_classifier_view_is_as_strong_as_autoattack_apgd_ce():
    """Same images, budget, iterations: the project's APGD-CE leaves no more images robust than the reference
    implementation's (within one image), and its perturbations respect the budget."""
    autoattack = pytest.importorskip("pyautoattack")
    classifier, images, labels = _classifier_problem()
    epsilon, steps = 1 / 255, 20
    ours = classifier_attack(classifier, images, labels, epsilon, steps=steps,
                             generator=torch.Generator().manual_seed(0))
    assert (ours.delta.flatten(1).abs().amax(1) <= epsilon + 1e-6).all()
    ours_robust = int((majority_predictions(classifier, images + ours.delta, 1)[0] == labels).sum())
    reference = autoattack.AutoAttack(classifier, norm="Linf", eps=epsilon, version="custom", attacks=["apgd-ce"],
                                      seed=0, device="cpu")
    reference.apgd.n_iter, reference.apgd.n_restarts = steps, 1
    adversarial, _ = reference.run_standard_evaluation(images, labels, batch_size=len(images))
    theirs_robust = int((majority_predictions(classifier, adversarial, 1)[0] == labels).sum())
    assert 0 < len(labels) - theirs_robust, "the budget must let the reference attack succeed somewhere"
    assert ours_robust <= theirs_robust + 1, (ours_robust, theirs_robust)


def test_the_classifier_view_scores_images_as_the_answer_path_does():
    """classifier(images) = the candidate scores of the prompt with the pixels the answer attack feeds the model
    for those [0, 1] images (its own `pixel_adapter`): both attack the same model on the same image set."""
    model = tiny_model("llava")
    prompt = tiny_inputs(model, num_images=1)
    classifier = AnswerClassifier(model, prompt, CANDIDATES)
    images = torch.rand(2, *prompt["pixel_values"].shape[1:], generator=torch.Generator().manual_seed(1))
    pixels = pixel_adapter(model).from_image(images, ImageInputs(prompt["pixel_values"].expand(2, -1, -1, -1)))
    batch = {k: v.expand(2, -1) for k, v in prompt.items() if k != "pixel_values"}
    prefixed, positions = CANDIDATES.with_prefix(batch, pad_token_id=0)
    with torch.no_grad():
        torch.testing.assert_close(classifier(images), CANDIDATES.scores(model, prefixed, positions, pixels))


@pytest.mark.parametrize("successes,total,expected", [(0, 10, (0.0, 0.2775)), (5, 10, (0.2366, 0.7634)),
                                                       (30, 30, (0.8865, 1.0))])
def test_wilson_interval_matches_known_values(successes, total, expected):
    low, high = wilson_interval(successes, total)
    assert low == pytest.approx(expected[0], abs=1e-3) and high == pytest.approx(expected[1], abs=1e-3)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def _row(variant, budget, attack, images):
    return {"variant": variant, "budget": budget, "attack": attack, "seconds": 10.0,
            "attacked": [im["index"] for im in images], "images": images}


def _image(index, mode, accuracy, success, evaluations=10):
    return {"index": index, "mode": mode, "accuracy": accuracy, "success": success, "evaluations": evaluations}


def test_the_worst_case_per_image_counts_every_attack_and_every_smaller_budget():
    rows = [
        _row("gsb", "linf:2", "apgd-ce", [_image(0, "untargeted", 0.25, 0.75), _image(1, "untargeted", 1.0, 0.0),
                                          _image(2, "untargeted", 1.0, 0.0)]),
        _row("gsb", "linf:4", "apgd-ce", [_image(1, "untargeted", 0.5, 0.5), _image(2, "untargeted", 1.0, 0.0)]),
        _row("gsb", "linf:4", "apgd-t", [_image(2, "targeted-next", 0.0, 1.0), _image(0, "targeted-next", 0.0, 0.25)]),
        _row("gsb", "l2:1", "apgd-ce", [_image(0, "untargeted", 1.0, 0.0)]),
        _row("plain", "linf:4", "apgd-ce", [_image(1, "untargeted", 0.0, 1.0)]),
    ]
    states = image_states(rows, "gsb", "linf:4", [0, 1, 2])
    assert states[0]["broken"] and not states[0]["target"]  # broken at 2/255 already; its targeted run missed
    assert not states[1]["broken"]  # exactly half the passes right is not "most passes wrong"
    assert states[2]["broken"] and states[2]["target"]
    assert not image_states(rows, "gsb", "linf:2", [2])[2]["broken"]  # a larger budget never counts downwards
    assert not image_states(rows, "gsb", "l2:1", [0])[0]["broken"]  # nor another norm
    cells = {(c.variant, c.budget): c for c in protocol_cells(rows, ["gsb", "plain"], ["apgd-ce", "apgd-t"])}
    four = cells["gsb", "linf:4"]
    assert (four.images, four.robust, four.targeted, four.attacks) == (3, 1, 1, ["apgd-ce", "apgd-t"])
    assert cells["gsb", "linf:2"].robust == 2 and cells["plain", "linf:4"].robust == 0
    assert four.seconds_per_100_steps == pytest.approx(100 * 20 / 40)
    low, high = four.robust_interval
    assert low < 1 / 3 < high


@pytest.mark.parametrize("text", ["linf", "linf:0", "l3:1", "l2:-1", "linf:x", 4])
def test_budgets_are_parsed_or_refused_by_name(text):
    with pytest.raises(ValueError, match="budget"):
        parse_budget(text)


class _ThreeInFour(torch.nn.Module):
    """A randomised classifier stand-in: of every 4 consecutive calls, 3 give class 1 (the untargeted attack's goal
    against label 0) and 1 gives class 0, whatever the input (which only carries a gradient)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, images):
        self.calls += 1
        goal = self.calls % 4 != 0
        base = images.mean((1, 2, 3))[:, None] * torch.tensor([1.0, -1.0])
        return base + torch.tensor([0.0, 2.0] if goal else [2.0, 0.0])


@pytest.mark.parametrize("confirm_runs, confirm_share, retired", [(0, 0.5, True), (4, 0.5, True), (4, 0.75, False)])
def test_early_stopping_retires_only_successes_its_confirmation_share_accepts(confirm_runs, confirm_share, retired):
    images = torch.full((1, 3, 4, 4), 0.5)
    attack = classifier_attack(_ThreeInFour(), images, torch.tensor([0]), 8 / 255, steps=6, eot_samples=1,
                               confirm_runs=confirm_runs, confirm_share=confirm_share,
                               generator=torch.Generator().manual_seed(0))
    assert (attack.first_success[0] >= 0) == retired  # 3 of 4 fresh calls confirm: enough for ½, not for ¾
    assert (attack.evaluations[0] < 7) == retired
    with pytest.raises(ValueError, match="confirm_share"):
        classifier_attack(_ThreeInFour(), images, torch.tensor([0]), 8 / 255, confirm_share=1.0)
