"""Certificate records: what was certified, with every parameter it was made with, as strict JSON."""

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import transformers

from ..version import __version__


NOISE_SPACE = "pixel [0,1], l2"
STOP_REASONS = ("n", "target", "unreachable", "futile")


def versions() -> dict[str, str]:
    return {"hf_feature_smoothing": __version__, "transformers": transformers.__version__, "torch": torch.__version__}


def prototypes_label(sha256: str) -> str:
    """`"prototypes 2112b455"`: the predictor of a prediction certificate, named by its prototypes file's digest."""
    return f"prototypes {sha256[:8]}"


def answers_label(record: dict) -> str:
    """`"answers 5cf255d0, booster 14b2eb8a"` (`", no booster"`): the candidate set and booster of an answer
    certificate, named by their digests (two answer settings of one model read apart in reports and cards)."""
    booster = record.get("booster_digest")
    return f"answers {record['candidates_digest'][:8]}, " + (f"booster {booster[:8]}" if booster else "no booster")


def target_label(record: dict) -> str:
    """The sequential targets of a certificate or a run's parameters: `"target FCSB ≥ 0.9"`, `"target R_τ ≥ 0.1"`
    (a vote's radius has no τ: `"target radius ≥ 0.5"`), comma-joined; `""` at a fixed n."""
    radius = "target radius ≥" if record.get("method") == "vote" else "target R_τ ≥"
    return ", ".join(f"{name} {record[key]:g}" for key, name in (("target_cosine", "target FCSB ≥"),
                                                                ("target_radius", radius))
                     if record.get(key) is not None)


def sequential_label(record: dict) -> str | None:
    """`"sequential, target FCSB ≥ 0.9, n ≤ 256"` (`", futility stop"` before the n with `futility`) for a run's
    parameters or a certificate that stops sampling at a target; `None` at a fixed n."""
    targets = target_label(record)
    futility = ", futility stop" if record.get("futility") else ""
    return f"sequential, {targets}{futility}, n ≤ {record.get('n')}" if targets else None


def measured_radii(record: dict, radii) -> list[float]:
    """The radii of `radii` at which prediction or answer certificates like `record` (a certificate or a run's
    parameters) measure certified accuracy: all of them at a fixed n; with a `target_radius`, those up to it. A
    certificate that stopped at its target certifies at least the target; how far beyond it would have reached was
    not sampled, so an accuracy at a larger radius would count those stops as failures."""
    target = record.get("target_radius")
    return [r for r in radii if target is None or r <= target]


def strict_json(value):
    """`value` with every non-finite float (NaN, ±inf) replaced by None, recursively: `json.dumps` then writes strict
    JSON (no bare `NaN` / `Infinity` tokens)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    return value


@dataclass
class FeatureCertificate:
    """
    Certificate of one image. With probability ≥ 1 − `alpha` over the certification noise, for every x' with
    ‖x' − x‖₂ ≤ ε (pixel [0, 1] units): cos(f̂(x'), v) ≥ `fcsb[i]` for `epsilon[i]`, and cos(f̂(x'), v) ≥ τ within
    `radius[j]` of x for `tau[j]`. v is the direction of f̂(x) estimated from `n0` separate samples
    (`reference="smoothed"`, default) or f(x) (`"clean"`, the paper's); f is the unit feature, centred first when
    `centered`. `None` / 0 = no certificate; `abstain` when `score_lower` ≤ 1/2.

    `n` is the most estimation samples allowed and `n_used` those the bound used: fewer when sequential
    certification stopped at `target_cosine` / `target_radius` (`stop="target"`) or when the target could no longer
    be reached within `n` (`stop="unreachable"`); `stop="n"` otherwise.

    Reference levels: `blank_cosine` is cos(f(grey), v) for a uniform grey image of the same size, and
    `unrelated_cosine` the largest cos(f(u), v) over the `unrelated_images` passed to `certify` (None without them):
    a certified cosine at or below these says no more than "as similar as a blank / unrelated image".

    `to_dict()` is strict JSON: non-finite floats become None.
    """

    index: int
    score: float
    score_lower: float
    abstain: bool
    epsilon: list[float]
    fcsb: list[float | None]
    tau: list[float]
    radius: list[float]
    sigma: float
    n0: int
    n: int
    alpha: float
    bound: str
    reference: str
    n_used: int = 0
    stop: str = "n"
    target_cosine: float | None = None
    target_radius: float | None = None
    blank_cosine: float | None = None
    unrelated_cosine: float | None = None
    centered: bool = False
    seed: int | None = None
    dtype: str = "float32"
    resolution: list[int] = field(default_factory=list)
    noise_space: str = NOISE_SPACE
    versions: dict[str, str] = field(default_factory=versions)

    def to_dict(self) -> dict:
        return strict_json(dataclasses.asdict(self))


@dataclass
class PredictionCertificate:
    """
    Certificate of a prediction among K prototypes, made by `method`:

    - `"margin"`: the FS prediction y = argmax_k cos(f̂(x), t_k). With probability ≥ 1 − `alpha`,
      argmax_k cos(f̂(x'), t_k) = `prediction` for every ‖x' − x‖₂ < `radius`. `runner_ups` are the classes the `n0`
      selection samples ranked right after the prediction; `alpha_split` says how α was shared among the K bounds
      (see [`~bounds.prediction_alphas`]).
    - `"vote"`: Cohen et al.'s smoothed classifier g(x) = argmax_c P(argmax_k cos(f(x + δ), t_k) = c). With
      probability ≥ 1 − `alpha`, g(x') = `prediction` for every ‖x' − x‖₂ < `radius` = σ Φ⁻¹(`p_lower`);
      `p_upper_runner_up` is 1 − `p_lower`, `hits` the votes for the prediction among `n_used` estimation samples,
      `stop` why sampling stopped (`"target"`: `target_radius` certified early; anytime-valid bound; `"futile"`:
      with `futility`, p_A below what the target needs was established, [`~statistics.vote.VoteBound`]).

    `prediction` is None (abstain) when the radius is 0. `prototypes_digest` names the predictor: SHA-256 (16 hex
    digits) of the prototypes' shape and values. `to_dict()` is strict JSON.
    """

    index: int
    prediction: int | None
    radius: float
    p_lower: float
    p_upper_runner_up: float
    label: int | None
    correct: bool | None
    sigma: float
    n0: int
    n: int
    alpha: float
    bound: str
    alpha_split: str = "runner_up"
    runner_ups: list[int] = field(default_factory=list)
    centered: bool = False
    seed: int | None = None
    dtype: str = "float32"
    resolution: list[int] = field(default_factory=list)
    noise_space: str = NOISE_SPACE
    versions: dict[str, str] = field(default_factory=versions)
    method: str = "margin"
    n_used: int | None = None
    hits: int | None = None
    stop: str = "n"
    target_radius: float | None = None
    prototypes_digest: str | None = None
    futility: bool = False

    def to_dict(self) -> dict:
        return strict_json(dataclasses.asdict(self))
