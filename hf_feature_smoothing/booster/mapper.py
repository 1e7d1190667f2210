"""The feature-space part of the booster: a noise-conditioned residual mapper, optionally mixing each image's tokens
(self-attention over its tokens, or a depth-wise convolution over its patch grid) before a token-wise MLP."""

import math

import torch
from torch import nn

from .layout import TokenLayout


NUM_FREQUENCIES = 8


def noise_embedding(sigma: float, like: torch.Tensor) -> torch.Tensor:
    """Sinusoidal features of log σ at 8 scales, `(16,)` in `like`'s dtype and device."""
    freqs = torch.arange(NUM_FREQUENCIES, device=like.device, dtype=torch.float32)
    angle = math.log(sigma) * torch.exp(freqs * math.log(2.0) / 2)
    return torch.cat([angle.sin(), angle.cos()]).to(like.dtype)


def film_head(hidden: int, out: int) -> nn.Sequential:
    """σ-embedding → FiLM parameters; the last layer starts at zero (γ = β = 0: no modulation)."""
    head = nn.Sequential(nn.Linear(2 * NUM_FREQUENCIES, hidden), nn.SiLU(), nn.Linear(hidden, out))
    nn.init.zeros_(head[-1].weight)
    nn.init.zeros_(head[-1].bias)
    return head


def _zero_linear(dim_in: int, dim_out: int) -> nn.Linear:
    layer = nn.Linear(dim_in, dim_out)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class TokenAttention(nn.Module):
    """FiLM_σ(LN(z)) → multi-head self-attention within each image's tokens → zero-initialised output projection."""

    def __init__(self, feature_dim: int, num_heads: int):
        super().__init__()
        if feature_dim % num_heads:
            raise ValueError(f"`mixing_heads`={num_heads} must divide the feature width {feature_dim}.")
        self.num_heads = num_heads
        self.film = film_head(feature_dim, 2 * feature_dim)
        self.qkv = nn.Linear(feature_dim, 3 * feature_dim)
        self.out = _zero_linear(feature_dim, feature_dim)

    def forward(self, rows: torch.Tensor, embedding: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        gamma, beta = self.film(embedding).chunk(2, dim=-1)
        x = nn.functional.layer_norm(rows, rows.shape[-1:]) * (1 + gamma) + beta
        update = torch.zeros_like(rows)
        for index in layout.segments:  # (S, L): one row of indices per image; images never attend to each other
            q, k, v = self.qkv(x[index]).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
            mixed = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
            update = update.index_copy(0, index.flatten(), self.out(mixed).flatten(0, 1))
        return update


class TokenConv(nn.Module):
    """FiLM_σ(LN(z)) → depth-wise k×k convolution over each image's patch grid → GELU → zero-initialised linear.
    Prefix tokens (CLS) are in no grid: their update is 0."""

    def __init__(self, feature_dim: int, kernel_size: int):
        super().__init__()
        self.film = film_head(feature_dim, 2 * feature_dim)
        self.conv = nn.Conv2d(feature_dim, feature_dim, kernel_size, padding=kernel_size // 2, groups=feature_dim)
        self.out = _zero_linear(feature_dim, feature_dim)

    def forward(self, rows: torch.Tensor, embedding: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        gamma, beta = self.film(embedding).chunk(2, dim=-1)
        x = nn.functional.layer_norm(rows, rows.shape[-1:]) * (1 + gamma) + beta
        update = torch.zeros_like(rows)
        for index in layout.grids:  # (F, h, w) row indices of the patch tokens, raster order
            grid = x[index].permute(0, 3, 1, 2)  # (F, D, h, w)
            mixed = self.out(nn.functional.gelu(self.conv(grid)).permute(0, 2, 3, 1))
            update = update.index_copy(0, index.flatten(), mixed.flatten(0, 2))
        return update


class GSBMapper(nn.Module):
    """
    Noise-aware residual mapper (paper notes §5.5): for features z (`(..., D)`) and noise level σ > 0, optionally
    z ← z + rms(z) · Mix_σ(z) (token mixing, see [`TokenAttention`], [`TokenConv`]), then
    z ↦ z + rms(z) · fc2(GELU(FiLM_σ(fc1(LN(z))))), where FiLM_σ scales and shifts with (1 + γ(σ), β(σ)) computed
    from sinusoidal features of log σ. Every output layer and FiLM head starts at zero, so an untrained mapper is the
    identity; at σ = 0 it is the identity by construction (the paper's l_id term holds exactly).

    Args:
        feature_dim (`int`): width D of the features.
        hidden_dim (`int`): hidden width of the token-wise MLP.
        mixing (`str`, *optional*): `"attention"`, `"conv"` or `None`.
        num_heads (`int`, *optional*, defaults to 4): attention heads.
        kernel_size (`int`, *optional*, defaults to 3): depth-wise convolution size.
    """

    def __init__(self, feature_dim: int, hidden_dim: int, mixing: str | None = None, num_heads: int = 4,
                 kernel_size: int = 3):
        super().__init__()
        self.norm = nn.LayerNorm(feature_dim, elementwise_affine=False)
        self.fc1 = nn.Linear(feature_dim, hidden_dim)
        self.fc2 = _zero_linear(hidden_dim, feature_dim)
        self.film = film_head(hidden_dim, 2 * hidden_dim)
        if mixing == "attention":
            self.mixing = TokenAttention(feature_dim, num_heads)
        elif mixing == "conv":
            self.mixing = TokenConv(feature_dim, kernel_size)
        elif mixing is None:
            self.mixing = None
        else:
            raise ValueError(f"`mixing` must be None, 'attention' or 'conv', got {mixing!r}.")

    def noise_embedding(self, sigma: float, like: torch.Tensor) -> torch.Tensor:
        return noise_embedding(sigma, like)

    def forward(self, features: torch.Tensor, sigma: float, layout: TokenLayout | None = None) -> torch.Tensor:
        if sigma <= 0:
            return features
        weight = self.fc1.weight
        z = features.to(weight.dtype)
        embedding = noise_embedding(sigma, z)
        if self.mixing is not None:
            if layout is None:
                raise ValueError("A token-mixing mapper needs the token layout of the call (`layout`).")
            rows = z.reshape(-1, z.shape[-1])
            scale = rows.pow(2).mean(-1, keepdim=True).sqrt()
            z = (rows + scale * self.mixing(rows, embedding, layout)).view_as(z)
        gamma, beta = self.film(embedding).chunk(2, dim=-1)
        hidden = nn.functional.gelu(self.fc1(self.norm(z)) * (1 + gamma) + beta)
        scale = z.pow(2).mean(-1, keepdim=True).sqrt()
        return (z + scale * self.fc2(hidden)).to(features.dtype)
