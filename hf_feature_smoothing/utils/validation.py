"""Argument checks whose errors name the argument, the value received and the fix."""

import math
import numbers
from dataclasses import dataclass

import torch


SEED_MAX = 2**63 - 1  # torch generators take seeds up to 2**64 - 1, numpy's and the run files' JSON ints 2**63 - 1
# noise larger than this swamps every [0, 1] image (the certificate would be vacuous) and its draws, divided by the
# processor's std and pushed through a tower, leave the range of float16 / bfloat16 arithmetic and then float32's
SIGMA_MAX = 1000.0


def as_scalar(value: object) -> object:
    """A 0-d tensor or numpy scalar / 0-d array as the Python number it holds (`tensor(0.25)` → 0.25); a bool stays a
    bool (to be refused), anything else is returned as is."""
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):
        return value.item()
    return value


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
        (out of range) naming the argument, the value, the range and why. 0-d tensors and numpy scalars count as
        the number they hold."""
        value = as_scalar(value)
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
    """Raise unless `value` is a finite real number > 0 (a 0-d tensor or numpy scalar too); returns a Python float."""
    value = as_scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}. {fix}".rstrip())
    return float(value)


def check_sigma(sigma: object, name: str = "sigma") -> float:
    """The one σ rule (smoothing config, `certify`, booster configs): a finite number in (0, `SIGMA_MAX`], as a
    Python float."""
    value = check_finite_positive(name, sigma, f"σ is the noise std in [0, 1] pixel units, e.g. `{name}=0.25`.")
    if value > SIGMA_MAX:
        raise ValueError(
            f"`{name}` must be at most {SIGMA_MAX:g}, got {value!r}: σ is the noise std in [0, 1] pixel units, so such "
            "noise swamps every image (the certificate would be vacuous) and overflows the tower's arithmetic into "
            f"NaN / inf features. Use a σ of the image's scale, e.g. `{name}=0.25`."
        )
    return value


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


def check_channels(name: str, channels: int, expected: int, shape: tuple[int, ...]) -> None:
    """Raise unless images of `shape` have the `expected` colour channels: a grayscale (1) or RGBA (4) image is never
    reinterpreted silently (a grayscale image broadcast to RGB would get the same noise in R, G and B)."""
    if channels == expected:
        return
    what = f"`{name}` has {channels} channel{'s' * (channels != 1)} (shape {shape}) but this tower takes {expected}"
    if expected == 3 and channels == 1:
        fix = ("a grayscale image: convert it to RGB explicitly (`images.repeat(1, 3, 1, 1)` for a tensor, "
               "`image.convert('RGB')` for a PIL image); it is not broadcast silently, as the noise would then be "
               "the same in R, G and B.")
    elif expected == 3 and channels == 4:
        fix = "an RGBA image: drop the alpha channel (`images[:, :3]`) or convert PIL images with `.convert('RGB')`."
    else:
        fix = f"pass images with {expected} channels, as the model's image processor returns them."
    raise ValueError(f"{what}: {fix}")


def is_class_index(value, num_classes: int | None = None) -> bool:
    """Whether `value` is a class index: an integer (Python or numpy, not a bool) ≥ 0 and below `num_classes`."""
    return (not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= 0
            and (num_classes is None or value < num_classes))
