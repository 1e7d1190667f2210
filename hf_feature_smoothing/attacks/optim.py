"""Batched PGD and Auto-PGD over perturbations of [0, 1] images: every image of the batch has its own ε-ball, step
size, momentum and best iterate, so one model call per step serves the whole batch."""

import math

import torch


NORMS = ("l2", "linf")
ALGORITHMS = ("pgd", "apgd")


def _per_image(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * (like.ndim - 1)))


def project(delta: torch.Tensor, epsilon: float, norm: str) -> torch.Tensor:
    """Project each image's δ onto its ε-ball (ℓ2 or ℓ∞)."""
    if norm == "linf":
        return delta.clamp(-epsilon, epsilon)
    lengths = delta.flatten(1).norm(dim=1)
    return delta * _per_image((epsilon / lengths.clamp_min(1e-12)).clamp(max=1.0), delta)


def feasible(images: torch.Tensor, delta: torch.Tensor, epsilon: float, norm: str) -> torch.Tensor:
    """Project onto the ε-ball, then keep x + δ in [0, 1]."""
    return ((images + project(delta, epsilon, norm)).clamp(0, 1) - images).detach()


def step_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "linf":
        return grad.sign()
    return grad / _per_image(grad.flatten(1).norm(dim=1).clamp_min(1e-12), grad)


def perturbation_norms(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """‖δ‖₂ or ‖δ‖∞ of each image's perturbation."""
    flat = delta.flatten(1)
    return flat.norm(dim=1) if norm == "l2" else flat.abs().amax(dim=1)


def random_start(images: torch.Tensor, epsilon: float, norm: str, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else images.device
    start = torch.randn(images.shape, generator=generator, device=device).to(images.device)
    scale = epsilon if norm == "linf" else epsilon / math.sqrt(images[0].numel())
    return feasible(images, start * scale, epsilon, norm)


def apgd_checkpoints(steps: int) -> set[int]:
    """Iterations where APGD may halve its step (Croce & Hein, 2020): p₀ = 0, p₁ = 0.22,
    p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06)."""
    points, previous, current = {0}, 0.0, 0.22
    while current <= 1:
        points.add(math.ceil(round(current * steps, 9)))
        previous, current = current, current + max(current - previous - 0.03, 0.06)
    return points


def pgd(loss_and_grad, images, epsilon, norm, steps, step_size, generator) -> torch.Tensor:
    delta = random_start(images, epsilon, norm, generator)
    for _ in range(steps):
        _, grad = loss_and_grad(delta)
        delta = feasible(images, delta - step_size * step_direction(grad, norm), epsilon, norm)
    return delta


def apgd(loss_and_grad, images, epsilon, norm, steps, generator, rho: float = 0.75, momentum: float = 0.75):
    """Auto-PGD minimising each image's loss: momentum steps, step size 2ε halved at checkpoints when fewer than ρ
    of the steps since the last checkpoint improved the loss, or when neither the step nor the best loss changed;
    a halving restarts from the best iterate (with the loss and gradient recorded there)."""
    checkpoints = apgd_checkpoints(steps)
    batch = images.shape[0]
    eta = torch.full((batch,), 2.0 * epsilon, device=images.device)
    delta = random_start(images, epsilon, norm, generator)
    loss, grad = loss_and_grad(delta)
    best_delta, best_loss, best_grad = delta.clone(), loss.clone(), grad.clone()
    previous = delta
    improved = torch.zeros(batch, device=images.device)
    last_checkpoint, eta_at_checkpoint, best_at_checkpoint = 0, eta.clone(), best_loss.clone()
    for k in range(steps):
        z = feasible(images, delta - _per_image(eta, delta) * step_direction(grad, norm), epsilon, norm)
        weight = 1.0 if k == 0 else momentum
        new = feasible(images, delta + weight * (z - delta) + (1 - weight) * (delta - previous), epsilon, norm)
        previous, delta = delta, new
        new_loss, grad = loss_and_grad(delta)
        improved += (new_loss < loss).float()
        loss = new_loss
        better = loss < best_loss
        best_delta[better], best_loss[better], best_grad[better] = delta[better], loss[better], grad[better]
        if k + 1 in checkpoints:
            stalled = improved < rho * (k + 1 - last_checkpoint)
            unchanged = (eta == eta_at_checkpoint) & (best_loss == best_at_checkpoint)
            reset = stalled | unchanged
            eta = torch.where(reset, eta / 2, eta)
            delta, previous = delta.clone(), previous.clone()
            delta[reset], previous[reset] = best_delta[reset], best_delta[reset]
            loss, grad = loss.clone(), grad.clone()
            loss[reset], grad[reset] = best_loss[reset], best_grad[reset]
            improved.zero_()
            last_checkpoint, eta_at_checkpoint, best_at_checkpoint = k + 1, eta.clone(), best_loss.clone()
    return best_delta


def run_batched_attack(loss_and_grad, images: torch.Tensor, epsilon: float, *, norm: str, steps: int,
                       algorithm: str, step_size: float | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """`algorithm` ("pgd" or "apgd") minimising, for every image of `images` (`(B, ...)` in [0, 1]) independently,
    `loss_and_grad(delta) -> (losses (B,), grads (B, ...))` over feasible perturbations; returns δ `(B, ...)`."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"`algorithm` must be one of {ALGORITHMS}, got {algorithm!r}.")
    if norm not in NORMS:
        raise ValueError(f"`norm` must be one of {NORMS}, got {norm!r}.")
    if epsilon == 0:
        return torch.zeros_like(images)
    if algorithm == "apgd":
        return apgd(loss_and_grad, images, epsilon, norm, steps, generator)
    return pgd(loss_and_grad, images, epsilon, norm, steps, step_size or 2.5 * epsilon / steps, generator)
