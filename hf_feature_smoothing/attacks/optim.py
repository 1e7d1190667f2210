"""Batched PGD and Auto-PGD over perturbations of [0, 1] images: every image of the batch has its own ε-ball, step
size, momentum and best iterate, so one model call per step serves the whole batch."""

import contextlib
import math
from dataclasses import dataclass

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


@dataclass
class BatchedAttack:
    """What a batched attack found: `delta` `(B, ...)`, and per image the iteration where it first succeeded
    (`first_success`, −1 when it did not or success was not tracked; 0 = the random start) and the number of
    loss-and-gradient evaluations it used (`evaluations`: an image stops being attacked once it succeeded)."""

    delta: torch.Tensor
    first_success: torch.Tensor
    evaluations: torch.Tensor


def eot_gradient(one_pass, delta: torch.Tensor, passes: int, autocast=None):
    """EOT over `passes` calls of `one_pass(delta) -> (losses (B,), hits (B,) bool)`, each drawing fresh noise: the
    mean losses and gradient in δ, and each row's hits — most passes gave the attack's goal (a tie is no hit)."""
    passes = max(1, passes)
    delta = delta.detach().requires_grad_(True)
    total, grad, hits = torch.zeros(len(delta), device=delta.device), torch.zeros_like(delta), torch.zeros(len(delta))
    with torch.enable_grad(), autocast or contextlib.nullcontext():
        for _ in range(passes):
            losses, hit = one_pass(delta)
            grad += torch.autograd.grad(losses.sum(), delta)[0] / passes
            total += losses.detach().to(delta.device) / passes
            hits += hit.float().cpu()
    return total, grad, hits > passes / 2


def _row_evaluator(loss_and_grad, stop_at_success: bool):
    """`evaluate(delta_rows, rows) -> (losses, grads, hits)`. Early stopping calls `loss_and_grad(delta, rows)` on
    the images still attacked and reads a third output, each row's success at δ; otherwise every call is on the
    whole batch (`loss_and_grad(delta)`) and nothing stops."""

    def evaluate(delta: torch.Tensor, rows: torch.Tensor):
        if not stop_at_success:
            loss, grad = loss_and_grad(delta)
            return loss.to(delta.device), grad, torch.zeros(len(rows), dtype=torch.bool, device=delta.device)
        loss, grad, hits = loss_and_grad(delta, rows)
        return loss.to(delta.device), grad, hits.to(device=delta.device, dtype=torch.bool)

    return evaluate


class _Progress:
    """Active rows, first-success iterations and evaluation counts of one batched attack."""

    def __init__(self, batch: int, device, stop_at_success: bool):
        self.stop = stop_at_success
        self.active = torch.ones(batch, dtype=torch.bool, device=device)
        self.first = torch.full((batch,), -1, dtype=torch.long)
        self.evaluations = torch.zeros(batch, dtype=torch.long)

    def rows(self) -> torch.Tensor:
        return self.active.nonzero().squeeze(1) if self.stop else torch.arange(len(self.active),
                                                                               device=self.active.device)

    def record(self, rows: torch.Tensor, hits: torch.Tensor, iteration: int) -> torch.Tensor:
        """Count one evaluation for `rows`, retire the rows that succeeded; returns those rows."""
        self.evaluations[rows.cpu()] += 1
        done = rows[hits]
        if self.stop and len(done):
            self.first[done.cpu()] = iteration
            self.active[done] = False
        return done


def pgd(loss_and_grad, images, epsilon, norm, steps, step_size, generator, stop_at_success=False) -> BatchedAttack:
    evaluate, progress = _row_evaluator(loss_and_grad, stop_at_success), _Progress(len(images), images.device,
                                                                                   stop_at_success)
    delta = random_start(images, epsilon, norm, generator)
    for k in range(steps):
        rows = progress.rows()
        if not len(rows):
            break
        _, grad, hits = evaluate(delta[rows], rows)
        progress.record(rows, hits, k)
        moving = rows[~hits]
        delta[moving] = feasible(images[moving], delta[moving] - step_size * step_direction(grad[~hits], norm),
                                 epsilon, norm)
    rows = progress.rows()
    if stop_at_success and len(rows):  # the last step's outcome
        _, _, hits = evaluate(delta[rows], rows)
        progress.record(rows, hits, steps)
    return BatchedAttack(delta, progress.first, progress.evaluations)


def apgd(loss_and_grad, images, epsilon, norm, steps, generator, rho: float = 0.75, momentum: float = 0.75,
         stop_at_success: bool = False) -> BatchedAttack:
    """Auto-PGD minimising each image's loss: momentum steps, step size 2ε halved at checkpoints when fewer than ρ
    of the steps since the last checkpoint improved the loss, or when neither the step nor the best loss changed;
    a halving restarts from the best iterate (with the loss and gradient recorded there). With `stop_at_success`
    an image whose iterate succeeds keeps that iterate and is no longer evaluated (as AutoAttack does)."""
    checkpoints = apgd_checkpoints(steps)
    batch = images.shape[0]
    evaluate, progress = _row_evaluator(loss_and_grad, stop_at_success), _Progress(batch, images.device,
                                                                                   stop_at_success)
    eta = torch.full((batch,), 2.0 * epsilon, device=images.device)
    delta = random_start(images, epsilon, norm, generator)
    rows = progress.rows()
    loss, grad, hits = evaluate(delta, rows)
    loss, grad = loss.clone(), grad.clone()  # updated in place below
    progress.record(rows, hits, 0)
    best_delta, best_loss, best_grad = delta.clone(), loss.clone(), grad.clone()
    previous = delta.clone()
    improved = torch.zeros(batch, device=images.device)
    last_checkpoint, eta_at_checkpoint, best_at_checkpoint = 0, eta.clone(), best_loss.clone()
    for k in range(steps):
        rows = progress.rows()
        if not len(rows):
            break
        d, p, x = delta[rows], previous[rows], images[rows]
        z = feasible(x, d - _per_image(eta[rows], d) * step_direction(grad[rows], norm), epsilon, norm)
        weight = 1.0 if k == 0 else momentum
        new = feasible(x, d + weight * (z - d) + (1 - weight) * (d - p), epsilon, norm)
        previous[rows], delta[rows] = d, new
        new_loss, new_grad, hits = evaluate(new, rows)
        improved[rows] += (new_loss < loss[rows]).float()
        loss[rows], grad[rows] = new_loss, new_grad
        better = rows[(new_loss < best_loss[rows]) | hits]  # a successful iterate is the one to keep
        best_delta[better], best_loss[better], best_grad[better] = delta[better], loss[better], grad[better]
        progress.record(rows, hits, k + 1)
        if k + 1 in checkpoints:
            stalled = improved < rho * (k + 1 - last_checkpoint)
            unchanged = (eta == eta_at_checkpoint) & (best_loss == best_at_checkpoint)
            reset = (stalled | unchanged) & progress.active
            eta = torch.where(reset, eta / 2, eta)
            delta[reset], previous[reset] = best_delta[reset], best_delta[reset]
            loss[reset], grad[reset] = best_loss[reset], best_grad[reset]
            improved.zero_()
            last_checkpoint, eta_at_checkpoint, best_at_checkpoint = k + 1, eta.clone(), best_loss.clone()
    return BatchedAttack(best_delta, progress.first, progress.evaluations)


def run_batched_attack(loss_and_grad, images: torch.Tensor, epsilon: float, *, norm: str, steps: int,
                       algorithm: str, step_size: float | None = None, generator: torch.Generator | None = None,
                       stop_at_success: bool = False) -> BatchedAttack:
    """`algorithm` ("pgd" or "apgd") minimising, for every image of `images` (`(B, ...)` in [0, 1]) independently,
    `loss_and_grad(delta) -> (losses (B,), grads (B, ...))` over feasible perturbations. With `stop_at_success`
    the attack only evaluates the images not yet broken: it calls `loss_and_grad(delta, rows)` with δ of the
    images `rows` (a `LongTensor` into the batch) and reads `(losses, grads, hits)`, `hits` each row's success."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"`algorithm` must be one of {ALGORITHMS}, got {algorithm!r}.")
    if norm not in NORMS:
        raise ValueError(f"`norm` must be one of {NORMS}, got {norm!r}.")
    if epsilon == 0:
        none = torch.zeros(len(images), dtype=torch.long)
        return BatchedAttack(torch.zeros_like(images), none - 1, none)
    if algorithm == "apgd":
        return apgd(loss_and_grad, images, epsilon, norm, steps, generator, stop_at_success=stop_at_success)
    return pgd(loss_and_grad, images, epsilon, norm, steps, step_size or 2.5 * epsilon / steps, generator,
               stop_at_success=stop_at_success)
