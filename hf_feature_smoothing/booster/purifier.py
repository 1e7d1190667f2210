"""The pixel-space part of the booster: a small σ-conditioned denoiser on the [0, 1] image (denoised smoothing,
Salman et al. 2020), run inside the tower call so that it sees the noisy image and belongs to the certified base
function. Also the conversions between a family's pixel layout and image batches."""

import torch
from torch import nn

from ..smoothing.towers import BoosterGeometry
from ..utils.deprecation import deprecated_aliases
from .mapper import film_head, noise_embedding


class GSBPurifier(nn.Module):
    """
    Residual denoiser r(u, σ) for images u in [0, 1] (`(N, C, H, W)`): pixel-unshuffle by `scale`, a 3×3 conv stem,
    `depth − 2` residual blocks FiLM_σ → GELU → 3×3 conv, and FiLM_σ → GELU → a zero-initialised 3×3 conv back to
    scale² · C channels, pixel-shuffled to full resolution. It returns the residual, so an untrained purifier adds
    exactly 0.

    Args:
        channels (`int`): image channels C.
        width (`int`): conv width.
        depth (`int`): conv layers (≥ 2).
        scale (`int`): pixel-unshuffle factor; the convs run at 1/scale resolution (scale = 2 quarters the cost).
    """

    def __init__(self, channels: int = 3, width: int = 32, depth: int = 5, scale: int = 2):
        super().__init__()
        self.scale = scale
        inner = channels * scale * scale
        self.stem = nn.Conv2d(inner, width, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(depth - 2))
        self.head = nn.Conv2d(width, inner, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.film = film_head(width, 2 * width * (depth - 1))

    def forward(self, image: torch.Tensor, sigma: float) -> torch.Tensor:
        height, width = image.shape[-2:]
        pad_h, pad_w = -height % self.scale, -width % self.scale
        x = image - 0.5
        if pad_h or pad_w:
            x = nn.functional.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        h = self.stem(nn.functional.pixel_unshuffle(x, self.scale))
        film = self.film(noise_embedding(sigma, h)).view(-1, 2, h.shape[1], 1, 1)
        for conv, (gamma, beta) in zip(self.blocks, film[:-1]):
            h = h + conv(nn.functional.gelu(h * (1 + gamma) + beta))
        gamma, beta = film[-1]
        residual = nn.functional.pixel_shuffle(self.head(nn.functional.gelu(h * (1 + gamma) + beta)), self.scale)
        return residual[..., :height, :width]


def patches_to_frames(rows: torch.Tensor, grid: torch.Tensor, geometry: BoosterGeometry) -> list[torch.Tensor]:
    """Qwen-VL pixel rows `(Σ t·h·w, C·T·p·p)` (m×m merge-window order) → one `(t·T, C, h·p, w·p)` frame batch per
    image."""
    c, tp, p, m = geometry.channels, geometry.temporal_patch_size, geometry.patch_size, geometry.merge_size
    frames = []
    for (t, h, w), part in zip(grid.tolist(), rows.split(grid.prod(-1).tolist())):
        x = part.reshape(t, h // m, w // m, m, m, c, tp, p, p).permute(0, 6, 5, 1, 3, 7, 2, 4, 8)
        frames.append(x.reshape(t * tp, c, h * p, w * p))
    return frames


def frames_to_patches(frames: list[torch.Tensor], grid: torch.Tensor, geometry: BoosterGeometry) -> torch.Tensor:
    """Inverse of [`patches_to_frames`]."""
    c, tp, p, m = geometry.channels, geometry.temporal_patch_size, geometry.patch_size, geometry.merge_size
    parts = []
    for (t, h, w), x in zip(grid.tolist(), frames):
        x = x.reshape(t, tp, c, h // m, m, p, w // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        parts.append(x.reshape(t * h * w, c * tp * p * p))
    return torch.cat(parts)

# names of 0.1.0 (the `FeatureBooster*` stem), kept as aliases that warn once
__getattr__ = deprecated_aliases(globals(), {"PixelPurifier": "GSBPurifier"})
