"""White-box PGD / APGD on the feature cosine of a (smoothed) vision tower, with EOT over the smoothing noise."""

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import check_images, check_positive_int
from ..modeling_smoothed_tower import SmoothedVisionTower
from ..towers import ImageInputs


NORMS = ("l2", "linf")
ALGORITHMS = ("pgd", "apgd")


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
    x = inputs.with_pixels(tower.adapter.from_image(image, inputs))
    if samples == 0:
        return tower.clean_unit_features(x)[-1]
    return torch.cat([sites[-1] for sites in tower.iter_unit_features(x, samples)]).float().mean(0)


def _project(delta: torch.Tensor, epsilon: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return delta.clamp(-epsilon, epsilon)
    length = delta.norm()
    return delta * min(1.0, epsilon / max(length.item(), 1e-12))


def _check_attack(epsilon: float, norm: str, steps: int, eot_samples: int, eval_samples: int, restarts: int) -> None:
    if norm not in NORMS:
        raise ValueError(f"`norm` must be one of {NORMS}, got {norm!r}.")
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon) or epsilon < 0:
        raise ValueError(f"`epsilon` must be a finite budget ≥ 0 in [0, 1] pixel units, got {epsilon!r}.")
    check_positive_int("steps", steps)
    check_positive_int("restarts", restarts)
    for name, value in (("eot_samples", eot_samples), ("eval_samples", eval_samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"`{name}` must be an int ≥ 0 (0 = the base, unsmoothed encoder), got {value!r}.")


def perturbation_norm(delta: torch.Tensor, norm: str) -> float:
    """‖δ‖₂ or ‖δ‖∞ of a perturbation, as attacks report it."""
    return delta.norm().item() if norm == "l2" else delta.abs().max().item()


def _step_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    return grad.sign() if norm == "linf" else grad / grad.norm().clamp_min(1e-12)


def _random_start(image: torch.Tensor, epsilon: float, norm: str, generator) -> torch.Tensor:
    start = torch.randn(image.shape, generator=generator, device=image.device)
    return _feasible(image, start * (epsilon if norm == "linf" else epsilon / math.sqrt(start.numel())), epsilon, norm)


def _feasible(image: torch.Tensor, delta: torch.Tensor, epsilon: float, norm: str) -> torch.Tensor:
    """Project onto the ε-ball, then keep x + δ in [0, 1]."""
    return ((image + _project(delta, epsilon, norm)).clamp(0, 1) - image).detach()


def _pgd(loss_and_grad, image, epsilon, norm, steps, step_size, generator) -> torch.Tensor:
    delta = _random_start(image, epsilon, norm, generator)
    for _ in range(steps):
        _, grad = loss_and_grad(delta)
        delta = _feasible(image, delta - step_size * _step_direction(grad, norm), epsilon, norm)
    return delta


def _apgd_checkpoints(steps: int) -> set[int]:
    """Iterations where APGD may halve its step (Croce & Hein, 2020): p₀ = 0, p₁ = 0.22,
    p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06)."""
    points, previous, current = {0}, 0.0, 0.22
    while current <= 1:
        points.add(math.ceil(round(current * steps, 9)))
        previous, current = current, current + max(current - previous - 0.03, 0.06)
    return points


def _apgd(loss_and_grad, image, epsilon, norm, steps, generator, rho: float = 0.75, momentum: float = 0.75):
    """Auto-PGD minimising the loss: momentum steps, step size 2ε halved at checkpoints when fewer than ρ of the
    steps since the last checkpoint improved the loss, or when neither the step nor the best loss changed."""
    checkpoints = _apgd_checkpoints(steps)
    eta = 2.0 * epsilon
    delta = _random_start(image, epsilon, norm, generator)
    loss, grad = loss_and_grad(delta)
    best_delta, best_loss = delta, loss
    previous = delta
    improved, last_checkpoint, eta_at_checkpoint, best_at_checkpoint = 0, 0, eta, best_loss
    for k in range(steps):
        z = _feasible(image, delta - eta * _step_direction(grad, norm), epsilon, norm)
        weight = 1.0 if k == 0 else momentum
        new = _feasible(image, delta + weight * (z - delta) + (1 - weight) * (delta - previous), epsilon, norm)
        previous, delta = delta, new
        new_loss, grad = loss_and_grad(delta)
        improved += new_loss < loss
        loss = new_loss
        if loss < best_loss:
            best_delta, best_loss = delta, loss
        if k + 1 in checkpoints:
            stalled = improved < rho * (k + 1 - last_checkpoint)
            unchanged = eta == eta_at_checkpoint and best_loss == best_at_checkpoint
            if stalled or unchanged:
                eta /= 2
                delta, previous = best_delta, best_delta
                loss, grad = loss_and_grad(delta)
            improved, last_checkpoint, eta_at_checkpoint, best_at_checkpoint = 0, k + 1, eta, best_loss
    return best_delta


def run_attack(loss_and_grad, image: torch.Tensor, epsilon: float, *, norm: str, steps: int, algorithm: str,
               step_size: float | None, generator: torch.Generator | None) -> torch.Tensor:
    """One run of `algorithm` ("pgd" or "apgd") minimising `loss_and_grad(delta) -> (float, grad)` over feasible
    perturbations δ of the [0, 1] image; returns δ."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"`algorithm` must be one of {ALGORITHMS}, got {algorithm!r}.")
    if epsilon == 0:
        return torch.zeros_like(image)
    if algorithm == "apgd":
        return _apgd(loss_and_grad, image, epsilon, norm, steps, generator)
    return _pgd(loss_and_grad, image, epsilon, norm, steps, step_size or 2.5 * epsilon / steps, generator)


def feature_attack(
    tower: SmoothedVisionTower,
    inputs: ImageInputs,
    reference: torch.Tensor,
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
) -> AttackResult:
    """
    Minimise cos(f̂(x + δ), reference) over ‖δ‖ ≤ ε (`norm` "l2" or "linf", pixel [0, 1] units, x + δ kept in
    [0, 1]) with `algorithm` "apgd" (Auto-PGD, default) or "pgd" (fixed step 2.5ε/steps), from a random start.
    Gradients of the smoothed feature are averaged over `eot_samples` noise draws per step (EOT); `eot_samples=0`
    attacks the base (unsmoothed) encoder. The best of `restarts` runs is re-measured with `eval_samples` fresh
    draws (0: the base encoder).
    """
    _check_attack(epsilon, norm, steps, eot_samples, eval_samples, restarts)
    check_images("inputs.pixel_values", inputs.pixel_values, inputs.pixel_values.ndim)
    if not torch.is_tensor(reference) or reference.ndim != 1 or not torch.isfinite(reference).all():
        raise ValueError("`reference` must be a finite 1-D feature vector (e.g. `tower.clean_unit_features(x)[-1]`).")
    image = tower.adapter.to_image(inputs).detach()
    reference = nn.functional.normalize(reference.detach().float(), dim=0)

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


def pgd_feature_attack(tower: SmoothedVisionTower, inputs: ImageInputs, reference: torch.Tensor, epsilon: float,
                       **kwargs) -> AttackResult:
    """[`feature_attack`] with `algorithm="pgd"`."""
    return feature_attack(tower, inputs, reference, epsilon, algorithm="pgd", **kwargs)


def apgd_feature_attack(tower: SmoothedVisionTower, inputs: ImageInputs, reference: torch.Tensor, epsilon: float,
                        **kwargs) -> AttackResult:
    """[`feature_attack`] with `algorithm="apgd"`."""
    return feature_attack(tower, inputs, reference, epsilon, algorithm="apgd", **kwargs)
