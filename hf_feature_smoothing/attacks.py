"""White-box PGD on the feature cosine of a (smoothed) vision tower, with EOT over the smoothing noise."""

import math
from dataclasses import dataclass

import torch
from torch import nn

from .modeling_smoothed_tower import SmoothedVisionTower
from .towers import ImageInputs


NORMS = ("l2", "linf")


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


def pgd_feature_attack(
    tower: SmoothedVisionTower,
    inputs: ImageInputs,
    reference: torch.Tensor,
    epsilon: float,
    *,
    norm: str = "l2",
    steps: int = 20,
    step_size: float | None = None,
    eot_samples: int = 8,
    eval_samples: int = 256,
    restarts: int = 1,
    generator: torch.Generator | None = None,
) -> AttackResult:
    """
    Minimise cos(f̂(x + δ), reference) over ‖δ‖ ≤ ε (`norm` "l2" or "linf", pixel [0, 1] units, x + δ kept in
    [0, 1]) by projected gradient descent with random start. Gradients of the smoothed feature are averaged over
    `eot_samples` noise draws per step (EOT); `eot_samples=0` attacks the base (unsmoothed) encoder. The best
    of `restarts` runs is re-measured with `eval_samples` fresh draws.
    """
    if norm not in NORMS:
        raise ValueError(f"`norm` must be one of {NORMS}, got {norm!r}.")
    image = tower.adapter.to_image(inputs).detach()
    step_size = step_size or 2.5 * epsilon / steps
    reference = nn.functional.normalize(reference.detach().float(), dim=0)
    best = None
    for _ in range(restarts):
        start = torch.randn(image.shape, generator=generator, device=image.device)
        delta = _project(start * (epsilon if norm == "linf" else epsilon / math.sqrt(start.numel())), epsilon, norm)
        delta = ((image + delta).clamp(0, 1) - image).detach()
        for _ in range(steps):
            delta.requires_grad_(True)
            with torch.enable_grad():
                cosine = nn.functional.cosine_similarity(_features(tower, inputs, image + delta, eot_samples),
                                                         reference, dim=0)
                (grad,) = torch.autograd.grad(cosine, delta)
            with torch.no_grad():
                if norm == "l2":
                    step = grad / grad.norm().clamp_min(1e-12)
                else:
                    step = grad.sign()
                delta = _project(delta - step_size * step, epsilon, norm)
                delta = ((image + delta).clamp(0, 1) - image).detach()
        with torch.no_grad():
            measured = nn.functional.cosine_similarity(
                _features(tower, inputs, image + delta, eval_samples), reference, dim=0
            ).item()
        if best is None or measured < best.cosine:
            length = delta.norm().item() if norm == "l2" else delta.abs().max().item()
            best = AttackResult(delta=delta, cosine=measured, norm=length)
    return best
