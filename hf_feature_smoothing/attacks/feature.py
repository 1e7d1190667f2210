"""White-box PGD / APGD on the feature cosine of a (smoothed) vision tower, with EOT over the smoothing noise."""

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..certification.certify import as_smoothed_tower
from ..certification.inputs import to_image_inputs
from ..smoothing.modeling_smoothed_tower import SmoothedVisionTower
from ..smoothing.towers import ImageInputs
from ..utils.validation import POSITIVE_INT, Range, check_positive_int
from .optim import NORMS, perturbation_norms, run_batched_attack


STEPS = POSITIVE_INT
NOISE_DRAWS = Range(int, 0, why="noise draws per step / per measurement; 0 = the base, unsmoothed encoder.")


@dataclass
class AttackResult:
    """`delta` is the perturbation of the [0, 1] pixel image; `cosine` the smoothed (or base) feature cosine to the
    reference at x + delta, measured with `eval_samples` fresh noise draws."""

    delta: torch.Tensor
    cosine: float
    norm: float


def _features(tower: SmoothedVisionTower, inputs: ImageInputs, image: torch.Tensor, samples: int) -> torch.Tensor:
    """Primary-site feature of the image tensor `image`: mean unit feature over `samples` noisy copies (EOT), or
    the base feature when `samples` is 0. Differentiable in `image`."""
    x = inputs.with_pixels(tower.family.from_image(image, inputs))
    if samples == 0:
        return tower.clean_unit_features(x)[-1]
    return torch.cat([sites[-1] for sites in tower.iter_unit_features(x, samples)]).float().mean(0)


def _check_attack(epsilon: float, norm: str, steps: int, eot_samples: int, eval_samples: int, restarts: int,
                  step_size: float | None = None) -> None:
    if norm not in NORMS:
        raise ValueError(f"`norm` must be one of {NORMS}, got {norm!r}.")
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon) or epsilon < 0:
        raise ValueError(f"`epsilon` must be a finite budget ≥ 0 in [0, 1] pixel units, got {epsilon!r}.")
    check_positive_int("steps", steps)
    check_positive_int("restarts", restarts)
    if step_size is not None and (isinstance(step_size, bool) or not isinstance(step_size, (int, float))
                                  or not math.isfinite(step_size) or step_size <= 0):
        # a negative or NaN step climbs the loss instead of descending, and the attack then reports "robust"
        raise ValueError(f"`step_size` must be a finite number > 0 (pixel [0, 1] units) or None (2.5ε/steps), got "
                         f"{step_size!r}.")
    for name, value in (("eot_samples", eot_samples), ("eval_samples", eval_samples)):
        NOISE_DRAWS.check(name, value)


def check_confirm_share(confirm_share: float) -> float:
    """The share of fresh confirming passes an early-stopped attack needs before retiring an image: in [0.5, 1)."""
    if isinstance(confirm_share, bool) or not isinstance(confirm_share, (int, float)) or not 0.5 <= confirm_share < 1:
        raise ValueError(f"`confirm_share` must be in [0.5, 1) (more than that share of the fresh passes must confirm "
                         f"a success), got {confirm_share!r}.")
    return float(confirm_share)


def perturbation_norm(delta: torch.Tensor, norm: str) -> float:
    """‖δ‖₂ or ‖δ‖∞ of a perturbation, as attacks report it."""
    return perturbation_norms(delta[None], norm).item()


def run_attack(loss_and_grad, image: torch.Tensor, epsilon: float, *, norm: str, steps: int, algorithm: str,
               step_size: float | None, generator: torch.Generator | None) -> torch.Tensor:
    """One run of `algorithm` ("pgd" or "apgd") minimising `loss_and_grad(delta) -> (float, grad)` over feasible
    perturbations δ of the [0, 1] image; returns δ (a batch of one for [`run_batched_attack`])."""

    def batched(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss, grad = loss_and_grad(delta[0])
        return torch.tensor([loss], device=delta.device), grad[None]

    return run_batched_attack(batched, image[None], epsilon, norm=norm, steps=steps, algorithm=algorithm,
                              step_size=step_size, generator=generator).delta[0]


def _single_image(images) -> bool:
    """Whether `images` names one image (an `ImageInputs` of one image or one PIL image) rather than a batch."""
    if isinstance(images, ImageInputs):
        return images.num_images == 1
    return type(images).__module__.startswith("PIL.") and hasattr(images, "convert")


def _references(reference, features: list[torch.Tensor]) -> list[torch.Tensor]:
    """One unit reference per image: the clean features (None), one `(F,)` vector for every image, or `(B, F)`."""
    if reference is None:
        return features
    if not torch.is_tensor(reference) or reference.ndim not in (1, 2) or not torch.isfinite(reference).all():
        raise ValueError("`reference` must be None (the clean feature f(x)), a finite `(F,)` feature vector or a "
                         f"`(B, F)` batch of them, got {reference if not torch.is_tensor(reference) else reference.shape}.")
    rows = [reference] * len(features) if reference.ndim == 1 else list(reference)
    if len(rows) != len(features):
        raise ValueError(f"`reference` has {len(rows)} rows for {len(features)} images.")
    for row, feature in zip(rows, features):
        if row.numel() != feature.numel():
            raise ValueError(f"`reference` has {row.numel()} values, the features have {feature.numel()}.")
        if not row.detach().float().norm() > 0:
            raise ValueError("`reference` has a zero row: it has no direction.")
    return [nn.functional.normalize(row.detach().float().to(f.device), dim=0) for row, f in zip(rows, features)]


def feature_attack(
    model_or_tower: nn.Module,
    images,
    reference: torch.Tensor | None,
    epsilon: float,
    *,
    norm: str = "l2",
    algorithm: str = "apgd",
    steps: int = 20,
    step_size: float | None = None,
    eot_samples: int = 8,
    eval_samples: int = 256,
    restarts: int = 1,
    generator: torch.Generator | None = None,
    input_space: str | None = None,
    image_grid_thw: torch.Tensor | None = None,
    image_size: int | None = None,
) -> "AttackResult | list[AttackResult]":
    """
    Minimise cos(f̂(x + δ), reference) over ‖δ‖ ≤ ε (`norm` "l2" or "linf", pixel [0, 1] units, x + δ kept in
    [0, 1]) with `algorithm` "apgd" (Auto-PGD, default) or "pgd" (fixed step 2.5ε/steps), from a random start.
    Gradients of the smoothed feature are averaged over `eot_samples` noise draws per step (EOT); `eot_samples=0`
    attacks the base (unsmoothed) encoder. The best of `restarts` runs is re-measured with `eval_samples` fresh
    draws (0: the base encoder).

    Args:
        model_or_tower (`nn.Module`): a `SmoothedVisionTower`, a smoothed MLLM or a supported stock model.
        images: the same inputs as [`~certification.certify`]: PIL image(s), an `ImageInputs`, the image
            processor's outputs, or a tensor of processed `pixel_values` / [0, 1] pixels (say which with
            `input_space`; `image_grid_thw` for Qwen-VL).
            One image (an `ImageInputs` of one image, or one PIL image) gives one `AttackResult`; a batch gives a
            list, one per image.
        reference (`torch.Tensor`, *optional*): the feature to move away from: None = the clean unit feature f(x)
            of each image; a `(F,)` vector (every image) or `(B, F)` (one per image).
    """
    _check_attack(epsilon, norm, steps, eot_samples, eval_samples, restarts, step_size)
    tower = as_smoothed_tower(model_or_tower)
    inputs_list = to_image_inputs(tower, images, input_space=input_space, image_grid_thw=image_grid_thw,
                                  image_size=image_size)
    clean = [tower.clean_unit_features(inputs)[-1].float() for inputs in inputs_list]
    references = _references(reference, clean)
    results = [_attack_one(tower, inputs, ref, epsilon, norm=norm, algorithm=algorithm, steps=steps,
                           step_size=step_size, eot_samples=eot_samples, eval_samples=eval_samples,
                           restarts=restarts, generator=generator)
               for inputs, ref in zip(inputs_list, references)]
    return results[0] if _single_image(images) else results


def _attack_one(tower: SmoothedVisionTower, inputs: ImageInputs, reference: torch.Tensor, epsilon: float, *,
                norm: str, algorithm: str, steps: int, step_size: float | None, eot_samples: int, eval_samples: int,
                restarts: int, generator: torch.Generator | None) -> AttackResult:
    image = tower.family.to_image(inputs).detach()

    def loss_and_grad(delta: torch.Tensor) -> tuple[float, torch.Tensor]:
        delta = delta.detach().requires_grad_(True)
        with torch.enable_grad():
            cosine = nn.functional.cosine_similarity(_features(tower, inputs, image + delta, eot_samples), reference, dim=0)
            (grad,) = torch.autograd.grad(cosine, delta)
        return cosine.item(), grad

    best = None
    for _ in range(restarts):
        delta = run_attack(loss_and_grad, image, epsilon, norm=norm, steps=steps, algorithm=algorithm,
                           step_size=step_size, generator=generator)
        with torch.no_grad():
            measured = nn.functional.cosine_similarity(
                _features(tower, inputs, image + delta, eval_samples), reference, dim=0
            ).item()
        if best is None or measured < best.cosine:
            best = AttackResult(delta=delta, cosine=measured, norm=perturbation_norm(delta, norm))
    return best


def pgd_feature_attack(model_or_tower: nn.Module, images, reference: torch.Tensor | None, epsilon: float,
                       **kwargs) -> "AttackResult | list[AttackResult]":
    """[`feature_attack`] with `algorithm="pgd"`."""
    return feature_attack(model_or_tower, images, reference, epsilon, algorithm="pgd", **kwargs)


def apgd_feature_attack(model_or_tower: nn.Module, images, reference: torch.Tensor | None, epsilon: float,
                        **kwargs) -> "AttackResult | list[AttackResult]":
    """[`feature_attack`] with `algorithm="apgd"`."""
    return feature_attack(model_or_tower, images, reference, epsilon, algorithm="apgd", **kwargs)
