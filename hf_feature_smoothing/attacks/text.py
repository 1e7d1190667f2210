"""End-to-end white-box attack on a multimodal LM: make it emit a target text, with EOT against smoothing noise."""

from dataclasses import dataclass

import torch
from torch import nn

from ..smoothing.configuration_feature_smoothing import FeatureSmoothingConfig
from ..smoothing.towers import ImageInputs, TowerFamily, base_model_type, get_tower_family
from ..utils.validation import check_images
from .feature import _check_attack, check_confirm_share, perturbation_norm, run_attack
from .optim import BatchedAttack, eot_gradient, feasible, perturbation_norms, run_batched_attack


def pixel_adapter(model: nn.Module, image_mean=None, image_std=None) -> TowerFamily:
    """The map between the model's pixel values and the [0, 1] image the attack budget is measured in: a smoothed
    model's own (its `smoothing_config` statistics); for a stock model `image_mean` / `image_std` when given, else
    the statistics of its checkpoint's processor config (`model.name_or_path`), else the family default with a
    warning. The budget of a plain and a smoothed model is then the same set of images."""
    tower = getattr(model, "smoothed_vision_tower", None)
    if tower is not None:
        if image_mean is not None or image_std is not None:
            raise ValueError("`image_mean` / `image_std` are for stock models; a smoothed model maps pixels with its "
                             "`smoothing_config.image_mean` / `image_std`.")
        return tower.family
    config = FeatureSmoothingConfig(image_mean=image_mean, image_std=image_std)
    if image_mean is None or image_std is None:
        from ..models.modeling_smoothed import fill_processor_settings

        fill_processor_settings(config, getattr(model, "name_or_path", "") or "", base_model_type(model))
    return get_tower_family(model, config)


@dataclass
class TextAttackResult:
    """`delta` perturbs the [0, 1] pixel image; `loss` is the target cross-entropy at x + δ (mean over `eval_runs`
    forward passes) and `success_rate` the fraction of those passes whose greedy continuation is the target."""

    delta: torch.Tensor
    loss: float
    success_rate: float
    norm: float


def _with_target(inputs: dict, target_ids: torch.Tensor) -> dict:
    """Append the target tokens to the prompt (teacher forcing); per-token side inputs grow with it."""
    length = inputs["input_ids"].shape[1]
    grown = {}
    for key, value in inputs.items():
        if key == "input_ids":
            grown[key] = torch.cat([value, target_ids.to(value.device)[None]], dim=1)
        elif torch.is_tensor(value) and value.ndim == 2 and value.shape[1] == length and key != "pixel_values":
            fill = torch.ones if key == "attention_mask" else torch.zeros
            grown[key] = torch.cat([value, fill(1, len(target_ids), dtype=value.dtype, device=value.device)], dim=1)
        else:
            grown[key] = value
    return grown


def target_text_attack(
    model: nn.Module,
    inputs: dict,
    target_ids: torch.Tensor,
    epsilon: float,
    *,
    norm: str = "linf",
    algorithm: str = "apgd",
    steps: int = 20,
    step_size: float | None = None,
    eot_samples: int = 2,
    eval_runs: int = 8,
    generator: torch.Generator | None = None,
    image_mean: list[float] | None = None,
    image_std: list[float] | None = None,
) -> TextAttackResult:
    """
    Targeted attack on the text an MLLM (stock or smoothed) generates: minimise the teacher-forced cross-entropy of
    `target_ids` after the prompt over image perturbations ‖δ‖ ≤ ε in [0, 1] pixel space (x + δ kept in [0, 1]).

    Each forward pass of a smoothed model draws fresh noise for all its n copies, so the gradient is averaged over
    `eot_samples` passes (EOT over n · `eot_samples` noise draws). Success is measured on `eval_runs` fresh passes:
    a pass succeeds when greedy decoding would produce exactly the target (every teacher-forced argmax matches).

    Args:
        model: a supported MLLM (`smoothed_*` or stock).
        inputs (`dict`): processor outputs for **one** image and prompt (`input_ids`, `attention_mask`,
            `pixel_values`, and `image_grid_thw` / `mm_token_type_ids` for Qwen-VL).
        target_ids (`torch.Tensor`): 1-D token ids of the target text.
        epsilon, norm, algorithm, steps, step_size: as for [`feature_attack`].
        image_mean, image_std (`list[float]`, *optional*): a stock model's processor statistics (default: read from
            its checkpoint, see [`pixel_adapter`]).
    """
    _check_attack(epsilon, norm, steps, eot_samples, eval_runs, 1, step_size)
    if "input_ids" not in inputs or "pixel_values" not in inputs or inputs["input_ids"].shape[0] != 1:
        raise ValueError("`inputs` must hold `input_ids` (one prompt) and `pixel_values`, as the processor returns.")
    target_ids = torch.as_tensor(target_ids).flatten()
    if target_ids.numel() == 0:
        raise ValueError("`target_ids` is empty; pass the token ids of the target text.")
    adapter = pixel_adapter(model, image_mean, image_std)
    image_inputs = ImageInputs(inputs["pixel_values"], inputs.get("image_grid_thw"))
    check_images("pixel_values", image_inputs.pixel_values, image_inputs.pixel_values.ndim)
    if image_inputs.num_images != 1:
        raise ValueError(f"`inputs` must hold one image, got {image_inputs.num_images}.")
    image = adapter.to_image(image_inputs).detach()
    full = _with_target(inputs, target_ids)
    keep = len(target_ids) + 1  # the vocabulary projection only where the target is predicted
    positions = slice(0, len(target_ids))
    target = target_ids.to(image.device)

    def logits_at(delta: torch.Tensor) -> torch.Tensor:
        pixel_values = adapter.from_image(image + delta, image_inputs)
        return model(**{**full, "pixel_values": pixel_values}, logits_to_keep=keep).logits[0, positions].float()

    def loss_and_grad(delta: torch.Tensor) -> tuple[float, torch.Tensor]:
        delta = delta.detach().requires_grad_(True)
        total, grad = 0.0, torch.zeros_like(delta)
        runs = max(1, eot_samples)
        with torch.enable_grad():
            for _ in range(runs):
                loss = nn.functional.cross_entropy(logits_at(delta), target)
                grad += torch.autograd.grad(loss, delta)[0] / runs
                total += loss.item() / runs
        return total, grad

    delta = run_attack(loss_and_grad, image, epsilon, norm=norm, steps=steps, algorithm=algorithm,
                       step_size=step_size, generator=generator)
    losses, hits = [], 0
    with torch.no_grad():
        for _ in range(max(1, eval_runs)):
            logits = logits_at(delta)
            losses.append(nn.functional.cross_entropy(logits, target).item())
            hits += bool((logits.argmax(-1) == target).all())
    return TextAttackResult(delta=delta, loss=sum(losses) / len(losses), success_rate=hits / max(1, eval_runs),
                            norm=perturbation_norm(delta, norm))


@dataclass
class AnswerAttackResult:
    """One image of a batched answer attack. `delta` perturbs its [0, 1] pixel image; over `eval_runs` fresh forward
    passes at x + δ, `accuracy` is the fraction whose greedy answer is the reference and `success` the fraction
    whose answer is the target (targeted) or is not the reference (untargeted); `loss` is the mean cross-entropy
    of the attacked answer (the target, or the reference for an untargeted attack) over those passes.
    `first_success` is the iteration where most of a step's EOT passes first gave the attack's answer, confirmed
    on fresh passes (−1: never, or not tracked) and `evaluations` the gradient steps spent on the image (each `eot_samples` passes)."""

    delta: torch.Tensor
    norm: float
    loss: float
    accuracy: float
    success: float
    first_success: int = -1
    evaluations: int = 0


def _given_delta(delta: torch.Tensor, images: torch.Tensor, epsilon: float, norm: str) -> torch.Tensor:
    if not torch.is_tensor(delta) or delta.shape != images.shape or not torch.isfinite(delta).all():
        raise ValueError(f"`delta` must be a finite tensor of the images' shape {tuple(images.shape)}, got "
                         f"{tuple(delta.shape) if torch.is_tensor(delta) else type(delta).__name__}.")
    delta = delta.to(images.device, images.dtype)
    if (perturbation_norms(delta, norm) > epsilon * (1 + 1e-5) + 1e-6).any() or not feasible(
            images, delta, epsilon, norm).allclose(delta, atol=1e-5):
        raise ValueError(f"`delta` must lie in the {norm} ball of radius {epsilon:g} and keep x + δ in [0, 1].")
    return delta


def _answer_batch(inputs: dict, answers: list[list[int]], pad_id: int) -> tuple[dict, list[slice]]:
    """Right-padded prompt + answer sequences with `logits_to_keep` (the vocabulary projection only from the first
    position that predicts an answer token on), and for each row the positions of the kept logits predicting its
    answer."""
    ids, mask = inputs["input_ids"], inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))
    rows, positions = [], []
    for row, answer in enumerate(answers):
        prompt = ids[row][mask[row].bool()].tolist()
        rows.append(prompt + list(answer))
        positions.append(slice(len(prompt) - 1, len(prompt) - 1 + len(answer)))
    length = max(len(r) for r in rows)
    full_ids = torch.full((len(rows), length), pad_id, dtype=ids.dtype)
    full_mask = torch.zeros((len(rows), length), dtype=mask.dtype)
    for row, tokens in enumerate(rows):
        full_ids[row, : len(tokens)] = torch.tensor(tokens)
        full_mask[row, : len(tokens)] = 1
    first = min(p.start for p in positions)
    positions = [slice(p.start - first, p.stop - first) for p in positions]
    return {"input_ids": full_ids.to(ids.device), "attention_mask": full_mask.to(ids.device),
            "logits_to_keep": length - first}, positions


def answer_attack(
    model: nn.Module,
    inputs: dict,
    reference_ids: list[list[int]],
    epsilon: float,
    *,
    target_ids: list[list[int]] | None = None,
    norm: str = "linf",
    algorithm: str = "apgd",
    steps: int = 10,
    step_size: float | None = None,
    eot_samples: int = 1,
    eval_runs: int = 4,
    pad_token_id: int = 0,
    gradient_dtype: str | None = None,
    generator: torch.Generator | None = None,
    image_mean: list[float] | None = None,
    image_std: list[float] | None = None,
    stop_at_success: bool = False,
    confirm_share: float = 0.5,
    delta: torch.Tensor | None = None,
) -> list[AnswerAttackResult]:
    """
    White-box attack on the answers an MLLM (stock or smoothed, LLaVA-style `(B, 3, H, W)` pixels) gives to a
    batch of image questions, every image with its own ε-ball (‖δ‖ ≤ ε in [0, 1] pixel space, x + δ in [0, 1]):
    **targeted** when `target_ids` is given (minimise the teacher-forced cross-entropy of the target answer) or
    **untargeted** (maximise that of the reference answer). Each forward pass of a smoothed model draws fresh noise
    for its n copies; gradients are averaged over `eot_samples` passes (EOT over n · `eot_samples` draws). The
    outcome is measured on `eval_runs` fresh passes: an answer counts as given when every teacher-forced argmax
    matches it, i.e. exactly when greedy decoding emits it.

    Args:
        model: a supported LLaVA-type MLLM (`smoothed_llava` or stock `llava`).
        inputs (`dict`): processor outputs for B prompts with one image each (`input_ids`, `attention_mask`,
            `pixel_values`); prompts end where the answer starts (right padding).
        reference_ids (`list[list[int]]`): the correct answer's token ids per image (end-of-turn included).
        target_ids (`list[list[int]]`, *optional*): the target answer per image (targeted attack).
        epsilon, norm, algorithm, steps, step_size: as for [`feature_attack`].
        gradient_dtype (`str`, *optional*): `"bfloat16"` computes the attack's gradients under autocast (faster where
            bf16 is native); the outcome is always measured in the model's own dtype.
        image_mean, image_std (`list[float]`, *optional*): a stock model's processor statistics (default: read from
            its checkpoint, see [`pixel_adapter`]).
        stop_at_success (`bool`): stop attacking an image once most of a step's EOT passes give the attack's answer
            and more than `confirm_share` of `eval_runs` fresh passes confirm it (the outcome is then measured on
            `eval_runs` other fresh passes), and only run the images still attacked through the model.
        confirm_share (`float`, *optional*, defaults to 0.5): the share of confirming passes an image needs before
            it is retired, in [0.5, 1): above ½ retires only clear successes (a borderline image retired early may
            measure as robust at the end, while attacking on could have broken it).
        delta (`torch.Tensor`, *optional*): `(B, 3, H, W)` perturbations of the [0, 1] images to measure instead of
            attacking (a transfer attack: δ found on another model); they must lie in the ε-ball and keep x + δ in
            [0, 1].
    """
    _check_attack(epsilon, norm, steps, eot_samples, eval_runs, 1, step_size)
    check_confirm_share(confirm_share)
    adapter = pixel_adapter(model, image_mean, image_std)
    pixel_values = inputs["pixel_values"]
    check_images("pixel_values", pixel_values, 4)
    batch = pixel_values.shape[0]
    for name, answers in (("reference_ids", reference_ids), ("target_ids", target_ids)):
        if answers is not None and (len(answers) != batch or not all(len(a) for a in answers)):
            raise ValueError(f"`{name}` must hold one non-empty answer per image ({batch}), got {answers!r}.")
    image_inputs = ImageInputs(pixel_values)
    images = adapter.to_image(image_inputs).detach()
    attacked = target_ids if target_ids is not None else reference_ids
    sign = 1.0 if target_ids is not None else -1.0
    runs = {name: _answer_batch(inputs, answers, pad_token_id)
            for name, answers in (("reference", reference_ids), ("target", target_ids)) if answers is not None}
    attacked_batch, attacked_positions = runs["target" if target_ids is not None else "reference"]

    everyone = torch.arange(batch)

    def logits(delta: torch.Tensor, batch_inputs: dict, rows: torch.Tensor = everyone) -> torch.Tensor:
        pixels = adapter.from_image(images[rows] + delta, ImageInputs(pixel_values[rows]))
        rows_inputs = {key: value[rows.to(value.device)] if torch.is_tensor(value) else value
                       for key, value in batch_inputs.items()}
        return model(**rows_inputs, pixel_values=pixels).logits.float()

    def row_losses(all_logits: torch.Tensor, positions: list[slice], answers: list[list[int]],
                   rows: torch.Tensor = everyone) -> torch.Tensor:
        return torch.stack([nn.functional.cross_entropy(all_logits[i, positions[row]],
                                                        torch.tensor(answers[row], device=all_logits.device))
                            for i, row in enumerate(rows.tolist())])

    def gives(all_logits: torch.Tensor, positions: list[slice], answers: list[list[int]],
              rows: torch.Tensor) -> torch.Tensor:
        """Whether each row's greedy (teacher-forced argmax) answer is `answers[row]`."""
        return torch.tensor([all_logits[i, positions[row]].argmax(-1).tolist() == list(answers[row])
                             for i, row in enumerate(rows.tolist())])

    def loss_and_grad(delta: torch.Tensor, rows: torch.Tensor = everyone):
        rows = rows.cpu()

        def one_pass(delta: torch.Tensor):
            out = logits(delta, attacked_batch, rows)
            given = gives(out.detach(), attacked_positions, attacked, rows)
            return sign * row_losses(out, attacked_positions, attacked, rows), given if target_ids is not None else ~given

        autocast = torch.autocast(delta.device.type, dtype=getattr(torch, gradient_dtype or "float32"),
                                  enabled=gradient_dtype is not None)
        total, grad, hits = eot_gradient(one_pass, delta, eot_samples, autocast)
        if not stop_at_success:
            return total, grad
        hit = hits.nonzero().squeeze(1)
        if len(hit):  # confirm on fresh passes before retiring: one lucky noise draw is not a success
            confirmed = torch.zeros(len(hit))
            with torch.no_grad():
                for _ in range(max(1, eval_runs)):
                    given = gives(logits(delta[hit.to(delta.device)].detach(), attacked_batch, rows[hit]),
                                  attacked_positions, attacked, rows[hit])
                    confirmed += (given if target_ids is not None else ~given).float()
            hits = hits.clone()
            hits[hit] = confirmed > confirm_share * max(1, eval_runs)
        return total, grad, hits

    if delta is None:
        attack = run_batched_attack(loss_and_grad, images, epsilon, norm=norm, steps=steps, algorithm=algorithm,
                                    step_size=step_size, generator=generator, stop_at_success=stop_at_success)
    else:  # a given perturbation (a transfer attack): measured, not optimised
        attack = BatchedAttack(_given_delta(delta, images, epsilon, norm), torch.full((batch,), -1), torch.zeros(batch))
    deltas = attack.delta
    correct, hit_target, losses = torch.zeros(batch), torch.zeros(batch), torch.zeros(batch)
    with torch.no_grad():
        for _ in range(max(1, eval_runs)):
            for name, (batch_inputs, positions) in runs.items():
                answers = reference_ids if name == "reference" else target_ids
                out = logits(deltas, batch_inputs)
                for row in range(batch):
                    predicted = out[row, positions[row]].argmax(-1).tolist()
                    given = float(predicted == list(answers[row]))
                    if name == "reference":
                        correct[row] += given
                    else:
                        hit_target[row] += given
                if (name == "target") == (target_ids is not None):
                    losses += row_losses(out, positions, answers).cpu()
    runs_done = max(1, eval_runs)
    accuracy, hit_target, losses = correct / runs_done, hit_target / runs_done, losses / runs_done
    success = hit_target if target_ids is not None else 1.0 - accuracy
    norms = perturbation_norms(deltas, norm)
    return [AnswerAttackResult(delta=deltas[row].cpu(), norm=norms[row].item(), loss=losses[row].item(),
                               accuracy=accuracy[row].item(), success=success[row].item(),
                               first_success=int(attack.first_success[row]),
                               evaluations=int(attack.evaluations[row])) for row in range(batch)]
