"""Argument checks whose errors name the argument, the value received and the fix."""

import math
import numbers

import torch


def check_finite_positive(name: str, value: object, fix: str = "") -> float:
    """Raise unless `value` is a finite real number > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}. {fix}".rstrip())
    return float(value)


def check_positive_int(name: str, value: object) -> int:
    """Raise unless `value` is an int ≥ 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"`{name}` must be an integer ≥ 1, got {value!r}.")
    return int(value)


def check_alpha(alpha: object) -> float:
    """Raise unless 0 < alpha < 1 (the failure probability of a confidence bound)."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 < alpha < 1:
        raise ValueError(f"`alpha` must be in (0, 1), got {alpha!r}; e.g. `alpha=0.001` for 99.9% confidence.")
    return float(alpha)


def check_images(name: str, images: object, ndim: int | tuple[int, ...]) -> torch.Tensor:
    """Raise unless `images` is a non-empty floating tensor of the expected rank with only finite values."""
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(images).__name__}.")
    if images.ndim not in ndims:
        raise ValueError(f"`{name}` must have {' or '.join(map(str, ndims))} dims, got shape {tuple(images.shape)}.")
    if images.numel() == 0 or images.shape[0] == 0:
        raise ValueError(f"`{name}` is empty (shape {tuple(images.shape)}); pass at least one image.")
    if not images.is_floating_point():
        raise TypeError(f"`{name}` must be a floating tensor, got {images.dtype}; convert with `.float()`.")
    if not torch.isfinite(images).all():
        raise ValueError(f"`{name}` contains NaN or inf values; clean or re-process the images.")
    return images
