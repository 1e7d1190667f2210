"""End-to-end white-box attack on a multimodal LM: make it emit a target text, with EOT against smoothing noise."""

from dataclasses import dataclass

import torch
from torch import nn

from ..configuration_feature_smoothing import FeatureSmoothingConfig
from ..errors import check_images
from ..towers import ImageInputs, get_tower_adapter
from .feature import _check_attack, perturbation_norm, run_attack


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
    """
    _check_attack(epsilon, norm, steps, eot_samples, eval_runs, 1)
    if "input_ids" not in inputs or "pixel_values" not in inputs or inputs["input_ids"].shape[0] != 1:
        raise ValueError("`inputs` must hold `input_ids` (one prompt) and `pixel_values`, as the processor returns.")
    target_ids = torch.as_tensor(target_ids).flatten()
    if target_ids.numel() == 0:
        raise ValueError("`target_ids` is empty; pass the token ids of the target text.")
    tower = getattr(model, "smoothed_vision_tower", None)
    adapter = tower.adapter if tower is not None else get_tower_adapter(model, FeatureSmoothingConfig())
    image_inputs = ImageInputs(inputs["pixel_values"], inputs.get("image_grid_thw"))
    check_images("pixel_values", image_inputs.pixel_values, image_inputs.pixel_values.ndim)
    if image_inputs.num_images != 1:
        raise ValueError(f"`inputs` must hold one image, got {image_inputs.num_images}.")
    image = adapter.to_image(image_inputs).detach()
    full = _with_target(inputs, target_ids)
    start = inputs["input_ids"].shape[1] - 1
    positions = slice(start, start + len(target_ids))
    target = target_ids.to(image.device)

    def logits_at(delta: torch.Tensor) -> torch.Tensor:
        pixel_values = adapter.from_image(image + delta, image_inputs)
        return model(**{**full, "pixel_values": pixel_values}).logits[0, positions].float()

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
