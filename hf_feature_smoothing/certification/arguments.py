"""The arguments of [`certify`] and [`certify_prediction`]: their defaults, ranges and checks, defined once and shared
with the `hf-fs` commands (which read their option defaults and ranges from here, and run the same checks before a
run file is written). Every error names the argument, the value, why it is refused and the fix; a command-line
caller passes the option name (`--target-cosine`) as `name`."""

import math
import numbers

import torch
from torch import nn

from ..smoothing.noise import fresh_seed
from ..statistics.betting import reach_shortfall
from ..statistics.bounds import CONFIDENCE_BOUNDS, score_for_certificate
from ..utils.validation import (
    ALPHA,
    POSITIVE_INT,
    SEED,
    SIGMA_MAX,
    Range,
    _label,
    as_scalar,
    check_alpha,
    check_positive_int,
    check_seed,
)


__all__ = [
    "ALPHA", "ALPHA_SPLITS", "CHUNK_SIZE", "CONFIDENCE_BOUNDS", "DEFAULTS", "EPSILON", "POSITIVE_INT",
    "PREDICTION_METHODS", "RADIUS", "REFERENCES", "SAMPLES", "SEED", "SEQUENTIAL_BOUNDS", "SIGMA", "TARGET_COSINE",
    "TARGET_RADIUS", "TAU", "check_alpha", "check_bound", "check_chunk_size", "check_futility", "check_labels",
    "check_prototypes", "check_reference", "check_sampling", "check_seed", "check_sequential", "check_target",
    "check_values", "target_score",
]

REFERENCES = ("smoothed", "clean")
ALPHA_SPLITS = ("runner_up", "flat")
PREDICTION_METHODS = ("margin", "vote")  # `certify_prediction`: FS margin on f̂, or Cohen's vote of single copies
SEQUENTIAL_BOUNDS = ("betting",)  # anytime-valid: the only bounds that allow stopping early (a target)

# Defaults of `certify` / `certify_prediction` (their signatures use these; `hf-fs certify` shows them).
DEFAULTS = {
    "epsilon": (0.0, 0.12, 0.25, 0.5), "tau": (0.5, 0.8), "n0": 64, "n": 1000, "alpha": 0.001, "bound": "betting",
    "reference": "smoothed", "alpha_split": "runner_up", "method": "vote",
}

SIGMA = Range(float, 0, SIGMA_MAX, low_open=True,
              why="σ is the noise std in [0, 1] pixel units, e.g. 0.25 (larger noise swamps every image).")
SAMPLES = Range(int, 1, why="a number of noise samples.")
CHUNK_SIZE = Range(int, 1, why="noisy copies per tower call (memory vs speed; certificates do not depend on it).")
EPSILON = Range(float, 0, why="ℓ2 budgets in [0, 1] pixel units, e.g. 0.25.")
RADIUS = Range(float, 0, why="ℓ2 radii in [0, 1] pixel units, e.g. 0.5.")
TAU = Range(float, 0, 1, high_open=True, why="cosine thresholds of the certified radii, e.g. 0.5.")
TARGET_COSINE = Range(float, 0, 1, low_open=True, high_open=True,
                      why="the certified cosine FCSB(ε) to reach: a target ≤ 0 needs no certificate and 1 is never "
                          "certified; e.g. 0.9.")
TARGET_RADIUS = Range(float, 0, low_open=True,
                      why="the certified radius R_τ to reach, in [0, 1] pixel units (ℓ2), e.g. 0.25.")


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{_label(name)} must be one of {', '.join(map(repr, choices))}, got {value!r}.")
    return value


def check_bound(bound: object, name: str = "bound") -> str:
    return check_choice(name, bound, tuple(CONFIDENCE_BOUNDS))


def check_reference(reference: object, name: str = "reference") -> str:
    return check_choice(name, reference, REFERENCES)


def check_chunk_size(chunk_size: object, name: str = "chunk_size") -> int:
    return CHUNK_SIZE.check(name, chunk_size)


def check_sampling(n0: object, n: object, alpha: object, bound: object, seed: object) -> int:
    """Validate the sampling arguments; returns the seed to use (a fresh one, recorded, when `seed` is None)."""
    check_positive_int("n0", n0)
    check_positive_int("n", n)
    check_alpha(alpha)
    check_bound(bound)
    seed = check_seed(seed)
    return fresh_seed() if seed is None else seed


def check_values(name: str, value: object, spec: Range) -> list[float]:
    """A scalar or a sequence of values in `spec`, as a list of Python floats (`epsilon`, `tau`); 0-d tensors and
    numpy scalars count as numbers, bools are refused."""
    value = as_scalar(value)
    scalar = isinstance(value, numbers.Real) or (isinstance(value, torch.Tensor) and value.ndim == 0)
    try:
        items = [as_scalar(v) for v in ([value] if scalar else value)]
        if any(isinstance(v, bool) for v in items):
            raise TypeError
        items = [float(v) for v in items]
    except (TypeError, ValueError):
        raise TypeError(f"{_label(name)} must be a number or a list of numbers, got {value!r}.") from None
    for v in items:
        if not spec.contains(v):
            raise ValueError(f"{_label(name)} must hold values that are each {spec.describe()}, got {v!r} in "
                             f"{items}{spec.hint()}")
    return items


def check_target(name: str, value: object, spec: Range) -> float | None:
    """`target_cosine` / `target_radius`: None (certify at a fixed n) or a value in `spec`."""
    value = as_scalar(value)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{_label(name)} must be {spec.describe()} or None, got {value!r}{spec.hint()}")
    return spec.check(name, value)


def check_futility(futility: object, target_radius: float | None) -> bool:
    """`futility` of a vote certificate: True or False, and True only with a `target_radius` (what it stops short of)."""
    if not isinstance(futility, bool):
        raise ValueError(f"`futility` must be True or False, got {futility!r}.")
    if futility and target_radius is None:
        raise ValueError("`futility=True` stops sampling once `target_radius` is out of reach: give a "
                         "`target_radius` (a vote certificate's), or leave `futility` False.")
    return futility


def _names(names: dict[str, str] | None) -> dict[str, str]:
    return {key: _label((names or {}).get(key, key)) for key in
            ("target_cosine", "target_radius", "epsilon", "tau", "bound", "sigma", "n")}


def _given(target_cosine, target_radius, names: dict[str, str]) -> str:
    return " / ".join(f"{names[k]} {v:g}" for k, v in (("target_cosine", target_cosine),
                                                        ("target_radius", target_radius)) if v is not None)


def check_sequential(target_cosine: float | None, target_radius: float | None, epsilons: list[float],
                     taus: list[float], bound: str, *, names: dict[str, str] | None = None) -> None:
    """What (range-checked) targets need whatever σ: an anytime-valid `bound`, an ε for a target cosine and a τ for
    a target radius. `names` maps argument names to the caller's (`{"target_cosine": "--target-cosine", ...}`)."""
    if target_cosine is None and target_radius is None:
        return
    names = _names(names)
    given = _given(target_cosine, target_radius, names)
    if bound not in SEQUENTIAL_BOUNDS:
        raise ValueError(f"{given}: sequential certification (stop once the target is certified) needs "
                         f"{names['bound']} betting, the only anytime-valid bound; {names['bound']} {bound} is valid "
                         f"at a fixed n only. Use {names['bound']} betting, or drop the target to certify at a fixed "
                         f"n.")
    if target_cosine is not None and not epsilons:
        raise ValueError(f"{names['target_cosine']} {target_cosine:g} needs at least one {names['epsilon']}.")
    if target_radius is not None and not taus:
        raise ValueError(f"{names['target_radius']} {target_radius:g} needs at least one {names['tau']}.")


def target_score(target_cosine: float | None, target_radius: float | None, epsilons: list[float],
                 taus: list[float], sigma: float, bound: str, *, n: int | None = None, alpha: float | None = None,
                 names: dict[str, str] | None = None) -> float | None:
    """The score S a sequential certificate has to certify for (range-checked) targets at noise level `sigma`, or
    None without a target; refuses what [`check_sequential`] refuses, a target that needs S = 1 and, given `n` and
    `alpha`, one that `n` samples cannot certify even if every score is 1 (out of reach: sampling would stop after
    one sample)."""
    if target_cosine is None and target_radius is None:
        return None
    check_sequential(target_cosine, target_radius, epsilons, taus, bound, names=names)
    names = _names(names)
    needed = [score_for_certificate(target_cosine, max(epsilons), sigma)] if target_cosine is not None else []
    if target_radius is not None:
        needed.append(score_for_certificate(max(taus), target_radius, sigma))
    score = max(needed)
    if score >= 1.0 or not math.isfinite(score):
        raise ValueError(f"{_given(target_cosine, target_radius, names)}: unreachable at σ={sigma:g} (it needs the "
                         f"score S = 1, i.e. every noisy feature equal to the reference); lower the target, lower the "
                         f"largest {names['epsilon']} / {names['tau']}, or raise {names['sigma']}.")
    shortfall = None if n is None or alpha is None else reach_shortfall(score, alpha, n)
    if shortfall:
        raise ValueError(f"{_given(target_cosine, target_radius, names)}: out of reach with {names['n']} {n} at "
                         f"σ={sigma:g} and α={alpha:g}: it needs S ≥ {score:.6g}, which {n} samples cannot certify "
                         f"even if every noisy feature equals the reference. Raise {names['n']} ({shortfall}) or "
                         "lower the target.")
    return score


def check_prototypes(prototypes: object, name: str = "prototypes", width: int | None = None) -> torch.Tensor:
    """`(K ≥ 2, F)` finite prototypes with no zero row (and F = `width` when given), as unit rows (float32)."""
    label = _label(name) + (":" if name.startswith("-") else "")
    if not isinstance(prototypes, torch.Tensor):
        raise TypeError(f"{label} must be a `(K, F)` torch.Tensor, got {type(prototypes).__name__}.")
    if prototypes.ndim != 2 or prototypes.shape[0] < 2 or prototypes.shape[1] < 1 \
            or not prototypes.is_floating_point():
        raise ValueError(f"{label} must be a floating (K ≥ 2, F) tensor, one row per class, got {prototypes.dtype} of "
                         f"shape {tuple(prototypes.shape)}: a prediction needs at least two classes to choose from; "
                         f"compute them with `hf-fs prototypes` / `class_prototypes` on a labelled set.")
    protos = prototypes.detach().double()
    bad = (~torch.isfinite(protos)).any(1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"{label} rows {bad[:10]} contain NaN or inf values; every prototype must be finite "
                         f"(recompute them).")
    zero = (protos.norm(dim=1) <= 1e-12).nonzero().flatten().tolist()
    if zero:
        raise ValueError(f"{label} rows {zero[:10]} are all zero: a zero prototype has no direction to compare to; "
                         f"drop those rows.")
    if width is not None and prototypes.shape[1] != width:
        raise ValueError(f"{label} {prototypes.shape[1]} features per class, but this model's features have "
                         f"{width}: the prototypes were computed with another model or image size; recompute them "
                         f"with the same --model / --booster / --image-size (`hf-fs prototypes`).")
    return nn.functional.normalize(protos, dim=-1).float()


def check_labels(labels, num_images: int, num_classes: int) -> list[int] | None:
    if labels is None:
        return None
    labels = list(labels.tolist() if isinstance(labels, torch.Tensor) else labels)
    if len(labels) != num_images:
        raise ValueError(f"`labels` has {len(labels)} entries for {num_images} images.")
    for label in labels:
        if isinstance(label, bool) or not isinstance(label, numbers.Integral) or not 0 <= label < num_classes:
            raise ValueError(f"`labels` must be class indices in [0, {num_classes}) (one per prototype row), got "
                             f"{label!r}.")
    return [int(label) for label in labels]
