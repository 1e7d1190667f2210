"""The noise-conditioning protocol between smoothing and the modules it drives. A module that behaves differently
under noise (the booster's tuner layers) subclasses [`NoiseConditioned`]; smoothing sets every such module's noise
level σ (pixel [0, 1] units) and the processor's pixel statistics around each tower pass, without knowing what the
module is. This keeps the smoothing core free of any booster import."""

import contextlib
import math
from collections.abc import Iterator, Sequence

from torch import nn

from ..utils.logging import get_logger
from .towers.processor import PixelStats


logger = get_logger(__name__)


class NoiseConditioned:
    """
    Mixin of modules conditioned on the smoothing noise: `noise_level` is the σ they act for (0: not under smoothing)
    and `pixel_stats` the processor's (mean, std) that map their input pixels to [0, 1] (None when unknown).
    """

    noise_level: float = 0.0
    pixel_stats: PixelStats | None = None

    def trained_noise_levels(self) -> tuple[float, ...] | None:
        """The noise levels σ the module was trained for (None: any)."""
        return None


ConditionState = list[tuple[NoiseConditioned, float, PixelStats | None]]


def conditioned_modules(model: nn.Module) -> list[NoiseConditioned]:
    """Every [`NoiseConditioned`] module of `model`."""
    return [m for m in model.modules() if isinstance(m, NoiseConditioned)]


def untrained_noise_level(model: nn.Module | Sequence[NoiseConditioned], sigma: float) -> tuple[float, ...] | None:
    """The noise levels the [`NoiseConditioned`] modules of `model` (or the modules given) were trained for, when
    `sigma` is none of them (a booster conditioned on a σ it never saw); None when it is one, or when no module says."""
    modules = conditioned_modules(model) if isinstance(model, nn.Module) else model
    levels = sorted({level for module in modules for level in module.trained_noise_levels() or ()})
    return tuple(levels) if levels and not any(math.isclose(sigma, level) for level in levels) else None


def set_noise_condition(model: nn.Module, sigma: float, image_mean: Sequence[float] | None = None,
                        image_std: Sequence[float] | None = None) -> ConditionState:
    """Condition every [`NoiseConditioned`] module of `model` on noise level `sigma` and the processor's pixel
    `image_mean` / `image_std`; returns the previous state for [`restore_noise_condition`]. A σ > 0 that the modules
    were not trained for is allowed (the model runs as conditioned, and certificates hold for it) but logged once."""
    stats = None if image_mean is None or image_std is None else PixelStats(tuple(image_mean), tuple(image_std))
    modules = conditioned_modules(model)
    trained = untrained_noise_level(modules, sigma) if sigma > 0 else None
    if trained:
        logger.warning_once(f"The booster is conditioned on σ={sigma:g} but was trained for σ in {list(trained)}: the "
                            "model runs (and is certified) as conditioned, but may be less robust than measured; "
                            f"smooth at one of {list(trained)} for the booster's measured robustness.")
    state = [(module, module.noise_level, module.pixel_stats) for module in modules]
    for module, _, _ in state:
        module.noise_level, module.pixel_stats = float(sigma), stats
    return state


def restore_noise_condition(state: ConditionState) -> None:
    """Undo a [`set_noise_condition`]."""
    for module, level, stats in state:
        module.noise_level, module.pixel_stats = level, stats


@contextlib.contextmanager
def noise_condition(model: nn.Module, sigma: float, image_mean: Sequence[float] | None = None,
                    image_std: Sequence[float] | None = None) -> Iterator[None]:
    """Condition every [`NoiseConditioned`] module of `model` on noise level `sigma` inside the block."""
    state = set_noise_condition(model, sigma, image_mean, image_std)
    try:
        yield
    finally:
        restore_noise_condition(state)


__all__ = ["ConditionState", "NoiseConditioned", "PixelStats", "conditioned_modules", "noise_condition",
           "restore_noise_condition", "set_noise_condition", "untrained_noise_level"]
