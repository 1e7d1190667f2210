"""Argument checks whose errors name the argument, the value received and the fix."""

import math
import numbers
from dataclasses import dataclass

import torch


SEED_MAX = 2**63 - 1  # torch generators take seeds up to 2**64 - 1, numpy's and the run files' JSON ints 2**63 - 1


def _label(name: str) -> str:
    """How an error names an argument: `name` for the Python API, as given for a command-line option (`--n`)."""
    return name if name.startswith("-") else f"`{name}`"


class WrongTypeError(TypeError, ValueError):
    """A value of the wrong type (a float for an integer, a bool for a number): a `TypeError`, and a `ValueError` as
    these checks raised before they were shared, so callers catching either keep working."""


@dataclass(frozen=True)
class Range:
    """The allowed values of one numeric argument, defined once for the API and the `hf-fs` options: an int or a
    finite float in [low, high] (each end open or closed, `None`: unbounded), with why it is so / how to fix it."""

    kind: type = float
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    why: str = ""

    def describe(self) -> str:
        what = f"a finite {'integer' if self.kind is int else 'number'}"
        low, high = (None if v is None else (str(int(v)) if self.kind is int else f"{v:g}") for v in (self.low, self.high))
        if self.low is not None and self.high is not None:
            return f"{what} in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{what} {'>' if self.low_open else '≥'} {low}"
        if self.high is not None:
            return f"{what} {'<' if self.high_open else '≤'} {high}"
        return what

    def contains(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))

    def check(self, name: str, value: object):
        """`value` as `kind`; a `WrongTypeError` (not a number / not an integer; bools are refused) or a `ValueError`
        (out of range) naming the argument, the value, the range and why."""
        integral = isinstance(value, numbers.Integral)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if self.kind is int else numbers.Real):
            raise WrongTypeError(f"{_label(name)} must be {self.describe()}, got {value!r} "
                            f"({type(value).__name__}){self.hint()}")
        if not self.contains(value if integral else float(value)):
            raise ValueError(f"{_label(name)} must be {self.describe()}, got {value!r}{self.hint()}")
        return int(value) if self.kind is int else float(value)

    def hint(self) -> str:
        return f"; {self.why}" if self.why else "."


SEED = Range(int, 0, SEED_MAX, why="a seed fixes all noise of a run; leave it out for a fresh one, recorded.")


def check_seed(seed: object, name: str = "seed") -> int | None:
    """The one seed rule (config, forward pass, `certify`, `attack_rows`, `hf-fs`): None, or an integer (numpy
    integers too, bools refused) in [0, 2**63 − 1]."""
    return None if seed is None else SEED.check(name, seed)


def check_finite_positive(name: str, value: object, fix: str = "") -> float:
    """Raise unless `value` is a finite real number > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}. {fix}".rstrip())
    return float(value)


POSITIVE_INT = Range(int, 1)
ALPHA = Range(float, 0, 1, low_open=True, high_open=True,
              why="the failure probability of a confidence bound, e.g. 0.001 for 99.9% confidence.")


def check_positive_int(name: str, value: object) -> int:
    """Raise unless `value` is an int ≥ 1."""
    return POSITIVE_INT.check(name, value)


def check_alpha(alpha: object, name: str = "alpha") -> float:
    """Raise unless 0 < alpha < 1 (the failure probability of a confidence bound)."""
    return ALPHA.check(name, alpha)


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
