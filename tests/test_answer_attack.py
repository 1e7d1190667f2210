"""Batched attacks on the answers of an MLLM (targeted / untargeted, stock and smoothed, per-image ε-balls)."""

import pytest
import torch

from hf_feature_smoothing.attacks.optim import perturbation_norms, run_batched_attack
from hf_feature_smoothing.attacks.text import answer_attack
from hf_feature_smoothing.testing_utils import tiny_inputs, tiny_model, tiny_smoothed_model


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_batched_apgd_solves_each_image_of_a_linear_problem(norm):
    """min ⟨w_b, δ_b⟩ for every image b of the batch independently: each reaches its own optimum."""
    generator = torch.Generator().manual_seed(0)
    images = torch.full((3, 3, 8, 8), 0.5)
    w = torch.randn(images.shape, generator=generator) * torch.tensor([1.0, 10.0, 0.1]).view(3, 1, 1, 1)
    epsilon = 0.3 if norm == "l2" else 0.05
    delta = run_batched_attack(lambda d: ((w * d).flatten(1).sum(1), w), images, epsilon, norm=norm, steps=30,
                               algorithm="apgd", generator=generator).delta
    optimum = -epsilon * (w.flatten(1).norm(dim=1) if norm == "l2" else w.flatten(1).abs().sum(1))
    assert (perturbation_norms(delta, norm) <= epsilon + 1e-5).all()
    assert ((images + delta) >= 0).all() and ((images + delta) <= 1).all()
    assert ((w * delta).flatten(1).sum(1) <= 0.95 * optimum).all()


def _batch(model, size=2):
    inputs = tiny_inputs(model, num_images=size)
    return {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values")}


@pytest.mark.parametrize("smoothed", [False, True])
def test_untargeted_answer_attack_raises_the_reference_loss(smoothed):
    model = tiny_smoothed_model("llava", num_samples=2, seed=0) if smoothed else tiny_model("llava")
    inputs, reference = _batch(model), [[11, 12], [13]]
    clean = answer_attack(model, inputs, reference, 0.0, steps=1, eval_runs=2)
    attacked = answer_attack(model, inputs, reference, 16 / 255, steps=6, eval_runs=2,
                             generator=torch.Generator().manual_seed(0))
    for before, after in zip(clean, attacked):
        assert after.norm <= 16 / 255 + 1e-6 and after.loss > before.loss
        assert after.success == pytest.approx(1.0 - after.accuracy)


def test_targeted_answer_attack_lowers_the_target_loss_and_reports_accuracy():
    model = tiny_model("llava")
    inputs, reference, target = _batch(model), [[11], [12]], [[21], [22]]
    clean = answer_attack(model, inputs, reference, 0.0, target_ids=target, steps=1, eval_runs=1)
    attacked = answer_attack(model, inputs, reference, 0.5, target_ids=target, norm="l2", steps=8, eval_runs=1,
                             generator=torch.Generator().manual_seed(0))
    for before, after in zip(clean, attacked):
        assert after.norm <= 0.5 + 1e-5 and after.loss < before.loss
        assert 0.0 <= after.accuracy <= 1.0 and 0.0 <= after.success <= 1.0


def test_answer_attack_refuses_a_mismatched_answer_list():
    model = tiny_model("llava")
    with pytest.raises(ValueError, match="`reference_ids`"):
        answer_attack(model, _batch(model), [[11]], 0.1)
    with pytest.raises(ValueError, match="`target_ids`"):
        answer_attack(model, _batch(model), [[11], [12]], 0.1, target_ids=[[1], []])


def test_stock_model_attack_budget_uses_its_checkpoints_processor_statistics(tmp_path):
    import json

    from hf_feature_smoothing.attacks.text import pixel_adapter

    model = tiny_model("llava")
    model.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.485, 0.456, 0.406],
                                                                   "image_std": [0.229, 0.224, 0.225]}))
    stock = type(model).from_pretrained(tmp_path)
    adapter = pixel_adapter(stock)
    assert list(adapter.image_std) == pytest.approx([0.229, 0.224, 0.225])
    assert list(pixel_adapter(stock, [0.5] * 3, [0.5] * 3).image_mean) == [0.5] * 3
    with pytest.raises(ValueError, match="smoothing_config"):
        pixel_adapter(tiny_smoothed_model("llava"), [0.5] * 3, [0.5] * 3)


@pytest.mark.parametrize("algorithm", ["apgd", "pgd"])
def test_early_stopping_retires_each_image_at_its_first_success(algorithm):
    """Images whose loss crosses their threshold stop being evaluated, keep the successful iterate and record the
    iteration; the others run every step."""
    generator = torch.Generator().manual_seed(0)
    images = torch.full((3, 3, 8, 8), 0.5)
    w = torch.randn(images.shape, generator=generator)
    epsilon, steps = 0.05, 20
    optimum = -epsilon * w.flatten(1).abs().sum(1)
    threshold = torch.tensor([0.2, 0.5, 10.0]) * optimum  # easy, medium, beyond the optimum
    calls = []

    def loss_and_grad(delta, rows=None):
        losses = (w[rows] * delta).flatten(1).sum(1)
        calls.append(rows.tolist())
        return losses, w[rows], losses <= threshold[rows]

    attack = run_batched_attack(loss_and_grad, images, epsilon, norm="linf", steps=steps, algorithm=algorithm,
                                generator=torch.Generator().manual_seed(1), stop_at_success=True)
    first, used = attack.first_success.tolist(), attack.evaluations.tolist()
    assert first[0] >= 0 and first[1] >= first[0] and first[2] == -1
    assert used[0] < used[2] and used[1] < used[2]
    assert not any(0 in rows for rows in calls[used[0]:])  # retired rows are never evaluated again
    reached = (w * attack.delta).flatten(1).sum(1)
    assert reached[0] <= threshold[0] and reached[1] <= threshold[1]
    plain = run_batched_attack(lambda d: ((w[2:] * d).flatten(1).sum(1), w[2:]), images[2:], epsilon, norm="linf",
                               steps=steps, algorithm=algorithm, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(plain.delta).all() and (plain.first_success == -1).all()


def test_answer_attack_stops_at_success_and_reports_it():
    """The tiny random model never gives these reference answers, so an untargeted attack has succeeded at its random
    start: early stopping retires every image after that one evaluation; without it every step is spent."""
    model = tiny_model("llava")
    inputs = _batch(model)
    reference = [[11, 12], [13]]
    stopped = answer_attack(model, inputs, reference, 8 / 255, steps=6, eval_runs=1, stop_at_success=True,
                            generator=torch.Generator().manual_seed(0))
    assert [(r.first_success, r.evaluations) for r in stopped] == [(0, 1), (0, 1)]
    assert all(r.success == 1.0 for r in stopped)
    full = answer_attack(model, inputs, reference, 8 / 255, steps=6, eval_runs=1,
                         generator=torch.Generator().manual_seed(0))
    assert [(r.first_success, r.evaluations) for r in full] == [(-1, 7), (-1, 7)]
