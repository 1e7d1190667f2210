"""Encoders whose Gaussian smoothing is known in closed form, behind a registered tower adapter."""

import math
from types import SimpleNamespace

import torch
from torch import nn

from hf_feature_smoothing.smoothing.towers import register_tower_family
from hf_feature_smoothing.smoothing.towers.vision import VisionEncoderFamily
from hf_feature_smoothing.statistics.bounds import normal_cdf


@register_tower_family
class ToyEncoderFamily(VisionEncoderFamily):
    model_types = ("toy_encoder",)
    default_image_mean = (0.0, 0.0, 0.0)
    default_image_std = (1.0, 1.0, 1.0)


class ToyEncoder(nn.Module):
    """Reads the first pixel z₁ of a `(B, 3, 1, 1)` image (processed = pixel values: identity normalisation).

    - `"angle"`: f(z) = (cos z₁, sin z₁), so cos(f(x + δ), f(x)) = cos δ₁ and S = (1 + exp(−σ²/2)) / 2; against a
      prototype t = (cos θ, sin θ), p = (1 + exp(−σ²/2) cos(x₁ − θ)) / 2.
    - `"sign"`: f(z) = u if z₁ < a else −u, so S = Φ((a − x₁)/σ) and ⟨f̂(x + εe₁), u⟩ = FCSB(ε) exactly (tight).
      `width` sets the feature width (u a fixed unit vector; default 2, u = (0.6, 0.8)).
    """

    def __init__(self, kind: str, threshold: float = 0.5, width: int = 2):
        super().__init__()
        self.kind, self.threshold = kind, threshold
        self.config = SimpleNamespace(model_type="toy_encoder", image_size=1)
        u = torch.tensor([0.6, 0.8]) if width == 2 else nn.functional.normalize(torch.arange(1.0, width + 1), dim=0)
        self.u = nn.Parameter(u, requires_grad=False)

    def forward(self, pixel_values: torch.Tensor):
        z = pixel_values.flatten(1)[:, 0].float()
        if self.kind == "angle":
            features = torch.stack([torch.cos(z), torch.sin(z)], dim=1)
        else:
            sign = torch.where(z < self.threshold, 1.0, -1.0)
            features = sign[:, None] * self.u
        return SimpleNamespace(pooler_output=features)

    def true_score(self, x1: float, sigma: float) -> float:
        if self.kind == "angle":
            return (1 + math.exp(-(sigma**2) / 2)) / 2
        return normal_cdf((self.threshold - x1) / sigma)

    def true_prototype_scores(self, x1: float, sigma: float, angles: torch.Tensor) -> torch.Tensor:
        """p_k = (1 + ⟨f̂(x), t_k⟩)/2 for prototypes t_k = (cos θ_k, sin θ_k) (`"angle"` only)."""
        return (1 + math.exp(-(sigma**2) / 2) * torch.cos(x1 - angles.double())) / 2


def toy_image(x1: float) -> torch.Tensor:
    image = torch.zeros(1, 3, 1, 1)
    image[0, 0] = x1
    return image


def toy_images(xs) -> torch.Tensor:
    """One toy image per value of x₁, `(len(xs), 3, 1, 1)`."""
    images = torch.zeros(len(xs), 3, 1, 1)
    images[:, 0, 0, 0] = torch.as_tensor(list(xs), dtype=torch.float32)
    return images
