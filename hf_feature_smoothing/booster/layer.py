"""The booster layer: a noise-conditioned residual feature mapper wrapped around one module of a frozen tower."""

import contextlib
import math
from collections.abc import Iterator

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .configuration_booster import FeatureBoosterConfig
from .registration import PARAMETER_PREFIX


NUM_FREQUENCIES = 8


class GSBMapper(nn.Module):
    """
    Noise-aware residual mapper (paper notes §5.5, token-wise variant): for features z (`(..., D)`) and noise level
    σ > 0, z ↦ z + rms(z) · fc2(GELU(FiLM_σ(fc1(LN(z))))), where FiLM_σ scales and shifts with (1 + γ(σ), β(σ))
    computed from sinusoidal features of log σ. `fc2` and the FiLM head start at zero, so an untrained mapper is the
    identity; at σ = 0 it is the identity by construction (the paper's l_id term holds exactly).
    """

    def __init__(self, feature_dim: int, hidden_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(feature_dim, elementwise_affine=False)
        self.fc1 = nn.Linear(feature_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, feature_dim)
        self.film = nn.Sequential(nn.Linear(2 * NUM_FREQUENCIES, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, 2 * hidden_dim))
        for layer in (self.fc2, self.film[-1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def noise_embedding(self, sigma: float, like: torch.Tensor) -> torch.Tensor:
        freqs = torch.arange(NUM_FREQUENCIES, device=like.device, dtype=torch.float32)
        angle = math.log(sigma) * torch.exp(freqs * math.log(2.0) / 2)  # log σ at 8 scales
        return torch.cat([angle.sin(), angle.cos()]).to(like.dtype)

    def forward(self, features: torch.Tensor, sigma: float) -> torch.Tensor:
        if sigma <= 0:
            return features
        weight = self.fc1.weight
        z = features.to(weight.dtype)
        gamma, beta = self.film(self.noise_embedding(sigma, z)).chunk(2, dim=-1)
        hidden = nn.functional.gelu(self.fc1(self.norm(z)) * (1 + gamma) + beta)
        scale = z.pow(2).mean(-1, keepdim=True).sqrt()
        return (z + scale * self.fc2(hidden)).to(features.dtype)


class FeatureBoosterLayer(nn.Module, BaseTunerLayer):
    """
    PEFT tuner layer: runs `base_layer` on boosted inputs (`position="before"`) or boosts its output (`"after"`).

    The noise level the mapper is conditioned on is `noise_level` (set by [`booster_noise_level`]; smoothing sets it
    to its σ around every tower pass). Without smoothing it is 0, so the booster is the identity.
    """

    adapter_layer_names = (f"{PARAMETER_PREFIX}mapper",)
    other_param_names = ("position",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: FeatureBoosterConfig):
        super().__init__()
        self.base_layer = base_layer
        self.fs_booster_mapper = nn.ModuleDict()
        self.position: dict[str, str] = {}
        self.noise_level = 0.0
        self._active_adapter = adapter_name
        self.merged_adapters = []
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: FeatureBoosterConfig) -> None:
        mapper = GSBMapper(config.feature_dim, config.hidden_dim)
        weight = next((p for p in self.base_layer.parameters()), None)
        if weight is not None:
            mapper.to(device=weight.device, dtype=weight.dtype if weight.is_floating_point() else None)
        self.fs_booster_mapper[adapter_name] = mapper
        self.position[adapter_name] = config.position
        self.set_adapter(adapter_name, inference_mode=config.inference_mode)

    def boost(self, features: torch.Tensor) -> torch.Tensor:
        for name in self.active_adapters:
            if name in self.fs_booster_mapper:
                features = self.fs_booster_mapper[name](features, self.noise_level)
        return features

    def forward(self, x: torch.Tensor, *args, **kwargs):
        active = [n for n in self.active_adapters if n in self.fs_booster_mapper]
        if self.disable_adapters or not active:
            return self.base_layer(x, *args, **kwargs)
        if self.position[active[0]] == "before":
            return self.base_layer(self.boost(x), *args, **kwargs)
        return self.boost(self.base_layer(x, *args, **kwargs))

    def merge(self, *args, **kwargs) -> None:
        raise NotImplementedError("A booster is a non-linear map: it cannot be merged into the base weights.")

    def unmerge(self, *args, **kwargs) -> None:
        pass

    def __repr__(self) -> str:
        return "fs_booster." + super().__repr__()


def booster_layers(model: nn.Module) -> list[FeatureBoosterLayer]:
    return [m for m in model.modules() if isinstance(m, FeatureBoosterLayer)]


@contextlib.contextmanager
def booster_noise_level(model: nn.Module, sigma: float) -> Iterator[None]:
    """Condition every booster in `model` on noise level `sigma` (pixel [0, 1] units) inside the block."""
    layers = booster_layers(model)
    previous = [layer.noise_level for layer in layers]
    for layer in layers:
        layer.noise_level = float(sigma)
    try:
        yield
    finally:
        for layer, level in zip(layers, previous):
            layer.noise_level = level
