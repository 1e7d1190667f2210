"""Monte Carlo certification of smoothed encoders: feature certificates (FCSB, radii) and prediction certificates
for cosine-similarity predictors. The math lives in `bounds.py`; this module only draws the samples."""

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import transformers
from torch import nn
from tqdm.auto import tqdm

from ..configuration_feature_smoothing import FeatureSmoothingConfig
from ..errors import check_alpha, check_finite_positive, check_positive_int
from ..modeling_smoothed_tower import SmoothedVisionTower
from ..noise import SeededNoise, fresh_seed, image_fingerprint
from ..towers import ImageInputs
from ..version import __version__
from .bounds import (
    CONFIDENCE_BOUNDS,
    certified_radius,
    fcsb,
    lower_confidence_bound,
    prediction_radius,
    upper_confidence_bound,
)


NOISE_SPACE = "pixel [0,1], l2"
REFERENCES = ("clean", "smoothed")


def _versions() -> dict[str, str]:
    return {"hf_feature_smoothing": __version__, "transformers": transformers.__version__,
            "torch": torch.__version__}


@dataclass
class FeatureCertificate:
    """
    Certificate of one image. With probability ≥ 1 − `alpha` over the certification noise, for every x' with
    ‖x' − x‖₂ ≤ ε (pixel [0, 1] units): cos(f̂(x'), v) ≥ `fcsb[i]` for `epsilon[i]`, and cos(f̂(x'), v) ≥ τ within
    `radius[j]` of x for `tau[j]`. v is f(x) (`reference="clean"`, the paper's) or the direction of f̂(x) estimated
    from `n0` separate samples (`"smoothed"`). `None` / 0 = no certificate; `abstain` when `score_lower` ≤ 1/2.
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
    seed: int | None = None
    dtype: str = "float32"
    resolution: list[int] = field(default_factory=list)
    noise_space: str = NOISE_SPACE
    versions: dict[str, str] = field(default_factory=_versions)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class PredictionCertificate:
    """
    Certificate of a cosine-similarity prediction y = argmax_k cos(f̂(x), t_k). With probability ≥ 1 − `alpha`,
    argmax_k cos(f̂(x'), t_k) = `prediction` for every ‖x' − x‖₂ < `radius`; `prediction` is None (abstain) when
    the radius is 0.
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
    seed: int | None = None
    dtype: str = "float32"
    resolution: list[int] = field(default_factory=list)
    noise_space: str = NOISE_SPACE
    versions: dict[str, str] = field(default_factory=_versions)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def as_smoothed_tower(
    model_or_tower: nn.Module, sigma: float | None = None, autocast_dtype: str | None = None
) -> SmoothedVisionTower:
    """A `SmoothedVisionTower` for a tower, a smoothed MLLM or a supported stock model, with noise level `sigma`
    (default: the tower's own σ) and `autocast_dtype` (default: the tower's own). The tower of a smoothed model is
    never modified: a different σ or dtype gives a new tower over the same encoder."""
    if isinstance(model_or_tower, SmoothedVisionTower):
        tower = model_or_tower
    elif isinstance(getattr(model_or_tower, "smoothed_vision_tower", None), SmoothedVisionTower):
        tower = model_or_tower.smoothed_vision_tower
    else:
        tower = SmoothedVisionTower(model_or_tower, FeatureSmoothingConfig(sigma=sigma or 0.25))
    changes = {}
    if sigma is not None and sigma != tower.sigma:
        changes["sigma"] = check_finite_positive("sigma", sigma)
    if autocast_dtype is not None and autocast_dtype != tower.config.autocast_dtype:
        changes["autocast_dtype"] = autocast_dtype
    if changes:
        tower = SmoothedVisionTower(tower.encoder, dataclasses.replace(tower.config, **changes))
    return tower


def _images(tower: SmoothedVisionTower, images, image_grid_thw, image_size: int | None = None) -> list[ImageInputs]:
    if isinstance(images, torch.Tensor):
        return tower.adapter.split(tower.check_inputs(images, image_grid_thw))
    if isinstance(images, ImageInputs):
        return tower.adapter.split(tower.check_inputs(images.pixel_values, images.image_grid_thw))
    from PIL import Image

    if not isinstance(images, (list, tuple)) or not all(isinstance(i, Image.Image) for i in images):
        raise TypeError(f"`images` must be processed `pixel_values` (a torch.Tensor), an `ImageInputs` or a list of "
                        f"PIL images, got {type(images).__name__}; convert arrays with `torch.from_numpy` or PIL.")
    if not images:
        raise ValueError("`images` is empty; pass at least one image.")
    return tower.adapter.split(tower.adapter.preprocess(list(images), image_size))


class _ImageNoise:
    """The two independent noise streams of one image (selection: n0 samples; estimation: n samples)."""

    def __init__(self, tower: SmoothedVisionTower, inputs: ImageInputs, seed: int):
        image = tower.adapter.to_image(inputs)
        fingerprint = image_fingerprint(image)
        self.resolution = list(image.shape[-2:]) if image.ndim == 4 else list(image.shape)
        self.selection = SeededNoise(seed, fingerprint, "selection")
        self.estimation = SeededNoise(seed, fingerprint, "estimation")


def _primary_features(
    tower: SmoothedVisionTower, inputs: ImageInputs, num: int, source: SeededNoise | None = None
) -> torch.Tensor:
    """Unit features of `num` noisy copies of one image, `(num, F)` float32 on the model's device."""
    return torch.cat([sites[-1].float() for sites in tower.iter_unit_features(inputs, num, source=source)])


def _reference(tower: SmoothedVisionTower, inputs: ImageInputs, reference: str, n0: int, source: SeededNoise):
    if reference == "clean":
        return tower.clean_unit_features(inputs)[-1].float()
    return nn.functional.normalize(_primary_features(tower, inputs, n0, source).mean(0), dim=0)


def _check(n0: int, n: int, alpha: float, bound: str, seed: int | None) -> int:
    """Validate the sampling arguments; returns the seed to use (a fresh one, recorded, when `seed` is None)."""
    check_positive_int("n0", n0)
    check_positive_int("n", n)
    check_alpha(alpha)
    if bound not in CONFIDENCE_BOUNDS:
        raise ValueError(f"`bound` must be one of {CONFIDENCE_BOUNDS}, got {bound!r}.")
    if seed is None:
        return fresh_seed()
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"`seed` must be an int ≥ 0 or None (a fresh seed, recorded), got {seed!r}.")
    return seed


def _compute_dtype(tower: SmoothedVisionTower) -> str:
    if tower.config.autocast_dtype is not None:
        return tower.config.autocast_dtype
    param = next(tower.encoder.parameters(), None)
    return str(param.dtype).removeprefix("torch.") if param is not None else "float32"


@torch.no_grad()
def certify(
    model_or_tower: nn.Module,
    images,
    epsilon: float | Sequence[float] = (0.0, 0.12, 0.25, 0.5),
    *,
    sigma: float | None = None,
    n0: int = 64,
    n: int = 1000,
    alpha: float = 0.001,
    tau: float | Sequence[float] = (0.5, 0.8),
    bound: str = "bernstein",
    reference: str = "clean",
    image_grid_thw: torch.Tensor | None = None,
    seed: int | None = None,
    autocast_dtype: str | None = None,
    image_size: int | None = None,
    progress: bool = False,
) -> list[FeatureCertificate]:
    """
    Certify the smoothed encoder's features on each image (CERTIFY of the FS paper with a sound lower bound).

    S = E[(1 + ⟨f(x + δ), v⟩) / 2] is estimated from `n` fresh noisy samples; its one-sided (1 − α) lower bound
    S_low gives FCSB(ε) = 2Φ(Φ⁻¹(S_low) − ε/σ) − 1 and R_τ = σ[Φ⁻¹(S_low) − Φ⁻¹((1+τ)/2)], both increasing in S, so
    they hold with probability ≥ 1 − α. FCSB < 0 bounds only the inner product and is reported as `None`.

    Args:
        model_or_tower (`nn.Module`): a `SmoothedVisionTower`, a smoothed MLLM or a supported stock model.
        images: processed `pixel_values` (plus `image_grid_thw` for Qwen-VL), an `ImageInputs`, or PIL images.
        epsilon (`float` or list): ℓ2 budgets in [0, 1] pixel units.
        sigma (`float`, *optional*): noise level; defaults to the tower's σ.
        n0 (`int`): samples that choose the reference direction (`reference="smoothed"` only; never reused).
        n (`int`): samples that estimate S.
        alpha (`float`): failure probability of the lower bound.
        tau (`float` or list): cosine thresholds for the certified radii.
        bound (`str`): `"bernstein"` (default: empirical Bernstein, far tighter when S is near 1, as for robust
            or boosted encoders) or `"hoeffding"` (distribution-free, conservative; better only for n ≲ 100).
        reference (`str`): `"clean"` (v = f(x), the paper's score) or `"smoothed"` (v = direction of f̂(x) from `n0`
            samples: S_v ≥ S in expectation, so a tighter certificate about the feature the model actually uses).
        seed (`int`, *optional*): with a seed, an image's noise (and certificate) depends only on (seed, image,
            parameters): not on its position among `images`, on earlier calls or on the chunk size. `None` draws a
            fresh seed from the OS, recorded in the certificate.
        autocast_dtype (`str`, *optional*): `"bfloat16"` / `"float16"` runs the tower passes under autocast; the
            certificate then covers the encoder *as computed in that dtype* (recorded as `dtype`).
        image_size (`int`, *optional*): resize/crop size for PIL images; defaults to the model's resolution.
    """
    seed = _check(n0, n, alpha, bound, seed)
    if reference not in REFERENCES:
        raise ValueError(f"`reference` must be one of {REFERENCES}, got {reference!r}.")
    epsilons = [float(e) for e in ([epsilon] if isinstance(epsilon, (int, float)) else epsilon)]
    taus = [float(t) for t in ([tau] if isinstance(tau, (int, float)) else tau)]
    if any(e < 0 for e in epsilons):
        raise ValueError(f"`epsilon` must be ≥ 0, got {epsilons}.")
    tower = as_smoothed_tower(model_or_tower, sigma, autocast_dtype)
    dtype = _compute_dtype(tower)
    results = []
    inputs_list = _images(tower, images, image_grid_thw, image_size)
    for index, inputs in enumerate(tqdm(inputs_list, desc="certify", disable=not progress)):
        noise = _ImageNoise(tower, inputs, seed)
        v = _reference(tower, inputs, reference, n0, noise.selection)
        scores = (1.0 + _primary_features(tower, inputs, n, noise.estimation) @ v).clamp(0.0, 2.0) / 2.0
        s_low = lower_confidence_bound(scores, alpha, bound)
        abstain = s_low <= 0.5
        bounds = [None if abstain or (b := fcsb(s_low, e, tower.sigma)) < 0 else b for e in epsilons]
        radii = [0.0 if abstain else certified_radius(s_low, tower.sigma, t) for t in taus]
        results.append(FeatureCertificate(
            index=index, score=scores.double().mean().item(), score_lower=s_low, abstain=abstain, epsilon=epsilons,
            fcsb=bounds, tau=taus, radius=radii, sigma=tower.sigma, n0=n0 if reference == "smoothed" else 0, n=n,
            alpha=alpha, bound=bound, reference=reference, seed=seed, dtype=dtype, resolution=noise.resolution,
        ))
    return results


@torch.no_grad()
def certify_prediction(
    model_or_tower: nn.Module,
    images,
    prototypes: torch.Tensor,
    labels: Sequence[int] | None = None,
    *,
    sigma: float | None = None,
    n0: int = 64,
    n: int = 1000,
    alpha: float = 0.001,
    bound: str = "bernstein",
    image_grid_thw: torch.Tensor | None = None,
    seed: int | None = None,
    autocast_dtype: str | None = None,
    image_size: int | None = None,
    progress: bool = False,
) -> list[PredictionCertificate]:
    """
    Certify a cosine-similarity predictor y(x) = argmax_k cos(f̂(x), t_k) (zero-shot classification, retrieval).

    With p_k(x) = (1 + ⟨f̂(x), t_k⟩)/2 for unit prototypes t_k, each p_k is the Gaussian smoothing of a [0, 1]-valued
    function, so Φ⁻¹(p_k(x + δ)) moves by at most ‖δ‖₂/σ. Hence the prediction stays y for every ‖δ‖₂ < R with

        R = (σ/2) [Φ⁻¹(p̲_y) − max_{k≠y} Φ⁻¹(p̄_k)],

    and p_y > p_k ⟺ cos(f̂, t_y) > cos(f̂, t_k) because the prototypes share the norm. y is chosen on `n0` samples;
    p̲_y and every p̄_k come from `n` other samples, each at level α/K (Bonferroni), so R holds with probability
    ≥ 1 − α. Abstains (prediction None) when R = 0. `seed`, `autocast_dtype` and `image_size` as for
    [`certify`].
    """
    seed = _check(n0, n, alpha, bound, seed)
    prototypes = nn.functional.normalize(prototypes.float(), dim=-1)
    if prototypes.ndim != 2 or prototypes.shape[0] < 2:
        raise ValueError(f"`prototypes` must be (K ≥ 2, F), got shape {tuple(prototypes.shape)}.")
    tower = as_smoothed_tower(model_or_tower, sigma, autocast_dtype)
    dtype = _compute_dtype(tower)
    inputs_list = _images(tower, images, image_grid_thw, image_size)
    if labels is not None and len(labels) != len(inputs_list):
        raise ValueError(f"`labels` has {len(labels)} entries for {len(inputs_list)} images.")
    k = prototypes.shape[0]
    results = []
    for index, inputs in enumerate(tqdm(inputs_list, desc="certify", disable=not progress)):
        noise = _ImageNoise(tower, inputs, seed)
        selection = _primary_features(tower, inputs, n0, noise.selection)
        if selection.shape[1] != prototypes.shape[1]:
            raise ValueError(f"`prototypes` have dim {prototypes.shape[1]}, features have {selection.shape[1]}.")
        protos = prototypes.to(selection.device)
        y = int((selection @ protos.T).mean(0).argmax())
        scores = (1.0 + _primary_features(tower, inputs, n, noise.estimation) @ protos.T).clamp(0.0, 2.0) / 2.0
        p_lower = lower_confidence_bound(scores[:, y], alpha / k, bound)
        p_upper = [upper_confidence_bound(scores[:, j], alpha / k, bound) for j in range(k) if j != y]
        radius = prediction_radius(p_lower, p_upper, tower.sigma)
        prediction = y if radius > 0 else None
        label = None if labels is None else int(labels[index])
        results.append(PredictionCertificate(
            index=index, prediction=prediction, radius=radius, p_lower=p_lower, p_upper_runner_up=max(p_upper),
            label=label, correct=None if label is None else prediction == label, sigma=tower.sigma, n0=n0, n=n,
            alpha=alpha, bound=bound, seed=seed, dtype=dtype, resolution=noise.resolution,
        ))
    return results
