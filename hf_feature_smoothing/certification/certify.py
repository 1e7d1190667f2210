"""Monte Carlo certification of smoothed encoders, in the order of Cohen et al.'s CERTIFY: select (a reference
direction, or the predicted class and its runner-ups, on n0 samples), estimate (n other samples), bound (a one-sided
1 − α confidence bound from `statistics`), radius. Feature certificates (FCSB, radii), sequential or at a fixed n,
and prediction certificates for cosine-similarity predictors; the sampling itself lives in `sampling.py`."""

import dataclasses
import math
import os
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..smoothing.configuration_feature_smoothing import FeatureSmoothingConfig
from ..smoothing.modeling_smoothed_tower import SmoothedVisionTower
from ..smoothing.towers import TOWER_FAMILIES, ImageInputs
from ..smoothing.towers.processor import resolve_pixel_stats
from ..statistics.betting import BettingTest
from ..statistics.bounds import (
    certified_radius,
    class_confidence_bounds,
    fcsb,
    lower_confidence_bound,
    moment_upper_bound,
    prediction_alphas,
    prediction_radius,
)
from ..statistics.vote import VoteBound, vote_result, vote_target
from ..utils.logging import get_logger
from ..utils.tensors import tensors_digest
from ..utils.validation import check_alpha, check_positive_int, check_sigma
from .arguments import (
    ALPHA_SPLITS,
    DEFAULTS,
    EPSILON,
    PREDICTION_METHODS,
    REFERENCES,
    TARGET_COSINE,
    TARGET_RADIUS,
    TAU,
    check_choice,
    check_futility,
    check_labels,
    check_prototypes,
    check_reference,
    check_sampling,
    check_target,
    check_values,
    target_score,
)
from .certificates import NOISE_SPACE, FeatureCertificate, PredictionCertificate
from .inputs import pass_dtype, to_image_inputs, tower_device, weights_dtype
from .prototypes import read_prototypes, tower_in_space
from .sampling import CleanJob, FeatureJob, ImageNoise, PredictionJob, VoteJob, blank_features, run_jobs


logger = get_logger(__name__)
RUNNER_UPS = 4  # classes ranked right after the prediction on the selection samples: they get most of α

__all__ = ["NOISE_SPACE", "REFERENCES", "FeatureCertificate", "PredictionCertificate", "as_smoothed_tower", "certify",
           "certify_prediction", "compute_dtype"]


# ----- towers, dtypes --------------------------------------------------------------------------------------------
def _checkpoint_stats(model: nn.Module, config: FeatureSmoothingConfig) -> None:
    """A stock model loaded from a folder (or the Hub cache: no download) is smoothed with the statistics of its
    checkpoint's processor files, as attacks measure it ([`~attacks.text.pixel_adapter`]); else the family default."""
    path = getattr(getattr(model, "config", None), "_name_or_path", None)
    family = getattr(getattr(model, "config", None), "model_type", None)
    if path and family in TOWER_FAMILIES:
        stats = resolve_pixel_stats(family, path=path, once=True, local_files_only=True)
        config.update({"image_mean": stats.mean, "image_std": stats.std})


def as_smoothed_tower(
    model_or_tower: nn.Module, sigma: float | None = None, autocast_dtype: str | None = None
) -> SmoothedVisionTower:
    """A `SmoothedVisionTower` for a tower, a smoothed MLLM or a supported stock model, with noise level `sigma`
    (default: the tower's own σ) and `autocast_dtype` (default: the tower's own; `"float32"` turns its autocast
    off; refused on half-precision weights). The tower of a smoothed model is never modified: a different σ or dtype
    gives a new tower over the same encoder. A σ that a booster of the model was not trained for logs a warning."""
    if isinstance(model_or_tower, SmoothedVisionTower):
        tower = model_or_tower
    elif isinstance(getattr(model_or_tower, "smoothed_vision_tower", None), SmoothedVisionTower):
        tower = model_or_tower.smoothed_vision_tower
    else:
        config = FeatureSmoothingConfig(sigma=0.25 if sigma is None else check_sigma(sigma))
        _checkpoint_stats(model_or_tower, config)
        tower = SmoothedVisionTower(model_or_tower, config)
    changes = {}
    sigma = None if sigma is None else check_sigma(sigma)
    if sigma is not None and sigma != tower.sigma:
        changes["sigma"] = check_sigma(sigma)
    if autocast_dtype is not None:  # "float32": no autocast, the passes run in the weights' dtype
        weights = weights_dtype(tower)
        if autocast_dtype == "float32" and weights != torch.float32:  # never record float32 for half passes
            raise ValueError(f"`autocast_dtype='float32'`: the model has {str(weights).removeprefix('torch.')} "
                             "weights, so its passes cannot run in float32; load a float32 copy (`model.float()`), "
                             "or leave `autocast_dtype` out to run (and record) the weights' dtype.")
        wanted = None if autocast_dtype == "float32" else autocast_dtype
        if wanted != tower.config.autocast_dtype:
            changes["autocast_dtype"] = wanted
    if changes:
        tower = SmoothedVisionTower(tower.encoder, dataclasses.replace(tower.config, **changes))
    return tower  # a booster conditioned on a σ it was not trained for is logged where it is conditioned


def compute_dtype(tower: SmoothedVisionTower) -> str:
    """The dtype the tower passes run in (recorded in certificates); warns when the CPU emulates it."""
    dtype = pass_dtype(tower)
    device = tower_device(tower)
    if device.type == "cpu" and dtype in ("bfloat16", "float16"):
        probe = getattr(torch.ops.mkldnn, f"_is_mkldnn_{'bf16' if dtype == 'bfloat16' else 'fp16'}_supported", None)
        if probe is None or not probe():
            logger.warning(
                f"`autocast_dtype={dtype!r}` on a CPU without native {dtype} support (capability "
                f"{torch.backends.cpu.get_cpu_capability()}): the passes are emulated and usually slower than float32. "
                "Use float32 (`autocast_dtype=None`) on this machine, or a GPU / a CPU with AVX512-BF16 or AMX."
            )
    return dtype


def _check_finite_result(index: int, **values: float) -> None:
    """The last guard before a certificate is built: NaN / inf never reach one (see `check_finite_features`)."""
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        raise ValueError(f"Image {index}: non-finite {bad}; no certificate is issued from NaN / inf. Check the tower "
                         "(finite weights, float32 with `autocast_dtype=None`) and σ (in [0, 1] pixel units).")


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return nn.functional.cosine_similarity(a.double().cpu(), b.double().cpu(), dim=0).item()


@torch.no_grad()
def certify(
    model_or_tower: nn.Module,
    images,
    epsilon: float | Sequence[float] = DEFAULTS["epsilon"],
    *,
    sigma: float | None = None,
    n0: int = DEFAULTS["n0"],
    n: int = DEFAULTS["n"],
    alpha: float = DEFAULTS["alpha"],
    tau: float | Sequence[float] = DEFAULTS["tau"],
    bound: str = DEFAULTS["bound"],
    reference: str = DEFAULTS["reference"],
    target_cosine: float | None = None,
    target_radius: float | None = None,
    input_space: str | None = None,
    image_grid_thw: torch.Tensor | None = None,
    unrelated_images=None,
    seed: int | None = None,
    autocast_dtype: str | None = None,
    image_size: int | None = None,
    progress: bool = False,
) -> list[FeatureCertificate]:
    """
    Certify the smoothed encoder's features on each image (CERTIFY of the FS paper with a sound lower bound).

    S = E[(1 + ⟨f(x + δ), v⟩) / 2] is estimated from up to `n` fresh noisy samples; its one-sided (1 − α) lower bound
    S_low gives FCSB(ε) = 2Φ(Φ⁻¹(S_low) − ε/σ) − 1 and R_τ = σ[Φ⁻¹(S_low) − Φ⁻¹((1+τ)/2)], both increasing in S, so
    they hold with probability ≥ 1 − α. FCSB < 0 bounds only the inner product and is reported as `None`. Several
    images share each tower call (`chunk_size` noisy copies in all); scores are reduced chunk by chunk, so memory
    does not grow with `n` (only the n scalar scores are kept).

    Args:
        model_or_tower (`nn.Module`): a `SmoothedVisionTower`, a smoothed MLLM or a supported stock model.
        images: PIL image(s), an `ImageInputs`, the image processor's outputs (`BatchFeature`), or a tensor:
            processed `pixel_values` (plus `image_grid_thw` for Qwen-VL) or `(B, 3, H, W)` [0, 1] pixels; say which
            with `input_space`.
        epsilon (`float` or list): ℓ2 budgets in [0, 1] pixel units (finite, ≥ 0).
        sigma (`float`, *optional*): noise level; defaults to the tower's σ.
        n0 (`int`, *optional*, defaults to 64): samples that choose the reference direction (`reference="smoothed"`
            only; never reused for the bound).
        n (`int`, *optional*, defaults to 1000): estimation samples; with a target, the most that may be drawn.
        alpha (`float`, *optional*, defaults to 0.001): failure probability of the certificate.
        tau (`float` or list): cosine thresholds in [0, 1) for the certified radii.
        bound (`str`, *optional*, defaults to `"betting"`): `"betting"` (Waudby-Smith & Ramdas; within ≈ 1.15× of
            the S·ln(1/α)/n limit of any valid bound on concentrated scores, and anytime-valid),
            `"bernstein"` (Maurer–Pontil empirical Bernstein) or `"hoeffding"` (distribution-free; tighter than
            Bernstein for high-variance scores at every n). The last two hold at a fixed n only.
        reference (`str`, *optional*, defaults to `"smoothed"`): `"smoothed"`: v = direction of an `n0`-sample
            estimate of f̂(x), so the certificate bounds cos(f̂(x'), v), smoothed attacked vs smoothed clean feature,
            which is what a smoothed model consumes (usually tighter: S_v → (1 + ‖f̂(x)‖)/2 ≥ S as n0 grows, but at
            small n0 the noisy v can make S_v lower than the clean-reference S). `"clean"`: v = f(x), the paper's
            score.
        target_cosine (`float`, *optional*): sequential certification: stop as soon as FCSB(ε) ≥ `target_cosine`
            is certified for every ε in `epsilon` (or as soon as that can no longer happen within `n` samples, even
            if every remaining score were 1). Needs `bound="betting"`: its confidence sequence is valid at every
            sample, so stopping early costs nothing in validity. The certificate reports `n_used` and `stop`. A
            target that `n` samples cannot certify even if every score is 1 is refused before sampling, with an `n`
            that can (it would stop every certificate after one sample).
        target_radius (`float`, *optional*): sequential certification until R_τ ≥ `target_radius` for every τ in
            `tau` (same rules; combined with `target_cosine`, both must be reached).
        input_space (`str`, *optional*): for tensor `images`, `"processed"` or `"pixel"`; required when the values
            allow both readings (see [`to_image_inputs`]).
        unrelated_images (*optional*): images (same kinds as `images`, same size) unrelated to the certified ones;
            each certificate records the largest cosine their clean features reach with v (`unrelated_cosine`), next
            to the cosine of a uniform grey image (`blank_cosine`, always recorded).
        seed (`int`, *optional*): with a seed, an image's noise (and certificate) depends only on (seed, image,
            parameters): not on its position among `images`, on the other images sharing its tower calls, on earlier
            calls or on the chunk size. `None` draws a fresh seed from the OS, recorded in the certificate.
        autocast_dtype (`str`, *optional*): `"bfloat16"` / `"float16"` runs the tower passes under autocast; the
            certificate then covers the encoder *as computed in that dtype* (its f, recorded as `dtype`), not the
            float32 encoder. On CPUs without native support it is emulated (a warning says so). Default: the
            tower's own; `"float32"` turns a smoothed model's own autocast off.
        image_size (`int`, *optional*): resize/crop size for PIL images; defaults to the model's resolution.
        progress (`bool`, *optional*): show a progress bar over images.
    """
    seed = check_sampling(n0, n, alpha, bound, seed)
    # as Python numbers (a 0-d tensor or numpy scalar is accepted), so certificates stay JSON-serialisable
    n0, n, alpha = check_positive_int("n0", n0), check_positive_int("n", n), check_alpha(alpha)
    check_reference(reference)
    epsilons = check_values("epsilon", epsilon, EPSILON)
    taus = check_values("tau", tau, TAU)
    target_cosine = check_target("target_cosine", target_cosine, TARGET_COSINE)
    target_radius = check_target("target_radius", target_radius, TARGET_RADIUS)
    tower = as_smoothed_tower(model_or_tower, sigma, autocast_dtype)
    target = target_score(target_cosine, target_radius, epsilons, taus, tower.sigma, bound, n=n, alpha=alpha)
    dtype = compute_dtype(tower)
    inputs_list = to_image_inputs(tower, images, input_space=input_space, image_grid_thw=image_grid_thw, image_size=image_size)
    unrelated = None
    if unrelated_images is not None:
        unrelated_jobs = [CleanJob(i) for i in to_image_inputs(tower, unrelated_images, input_space=input_space,
                                                                image_size=image_size, name="unrelated_images")]
        run_jobs(tower, unrelated_jobs)
        unrelated = [job.feature for job in unrelated_jobs]
    blanks = blank_features(tower, inputs_list)
    if unrelated is not None and any(u.numel() != blanks[0].numel() for u in unrelated):
        raise ValueError("`unrelated_images` give features of another size than `images`; pass images of the same "
                         "size (e.g. PIL images, resized to the same `image_size`).")
    jobs = []
    for inputs in inputs_list:
        noise = ImageNoise(tower, inputs, seed)
        test = None if target is None else BettingTest(target, alpha, n)
        jobs.append(FeatureJob(inputs, noise, reference, n0, n, test))
    with tqdm(total=len(jobs), desc="certify", disable=not progress) as bar:
        run_jobs(tower, jobs, bar)
    all_scores = [job.all_scores() for job in jobs]
    # one image at a time: a bound computed inside a batch could differ in the last bits (SIMD / threading)
    lows = [lower_confidence_bound(s, alpha, bound, n if bound == 'betting' else None) for s in all_scores]
    results = []
    for index, (job, blank, scores, s_low) in enumerate(zip(jobs, blanks, all_scores, lows)):
        if job.stop == "target":
            s_low = max(s_low, target)  # the test rejected E[s] ≤ target_score: the sequence is above it
        _check_finite_result(index, score=scores.mean().item(), score_lower=s_low)
        abstain = s_low <= 0.5
        bounds = [None if abstain or (b := fcsb(s_low, e, tower.sigma)) < 0 else b for e in epsilons]
        radii = [0.0 if abstain else certified_radius(s_low, tower.sigma, t) for t in taus]
        results.append(FeatureCertificate(
            index=index, score=scores.mean().item(), score_lower=s_low, abstain=abstain, epsilon=epsilons,
            fcsb=bounds, tau=taus, radius=radii, sigma=tower.sigma, n0=n0 if reference == "smoothed" else 0, n=n,
            alpha=alpha, bound=bound, reference=reference, n_used=scores.numel(), stop=job.stop,
            target_cosine=target_cosine, target_radius=target_radius, blank_cosine=_cosine(blank, job.v),
            unrelated_cosine=None if unrelated is None else max(_cosine(u, job.v) for u in unrelated),
            centered=tower.config.feature_center is not None, seed=seed, dtype=dtype,
            resolution=job.noise.resolution,
        ))
    return results


@torch.no_grad()
def certify_prediction(
    model_or_tower: nn.Module,
    images,
    prototypes: torch.Tensor | str | os.PathLike,
    labels: Sequence[int] | None = None,
    *,
    sigma: float | None = None,
    n0: int = DEFAULTS["n0"],
    n: int = DEFAULTS["n"],
    alpha: float = DEFAULTS["alpha"],
    bound: str = DEFAULTS["bound"],
    alpha_split: str | None = None,
    input_space: str | None = None,
    image_grid_thw: torch.Tensor | None = None,
    seed: int | None = None,
    autocast_dtype: str | None = None,
    image_size: int | None = None,
    progress: bool = False,
    method: str = DEFAULTS["method"],
    target_radius: float | None = None,
    futility: bool = False,
) -> list[PredictionCertificate]:
    """
    Certify a prediction among K prototypes t_k (zero-shot classification, retrieval), by one of two methods. The
    default is `"vote"`: on the side-by-side benchmark (`benchmarks/prediction_certificates.py`: the real LLaVA's
    DINOv2 tower + booster, held-out digits, σ = 0.5, the same n0 = 16 + n = 500 copies and α = 0.001) it certifies
    more at every radius r > 0 (72 / 62 / 44 % of 100 digits at r = 0.1 / 0.5 / 1.0 against 44 / 0 / 0 % for the
    margin method with class-mean prototypes and 46 / 0 / 0 % with fitted ones, all on the centred projected
    feature, the margin method's best setting). The vote's score is 0 or 1 per
    copy, so p̲_A comes close to 1, while the margin method's scores p_k = (1 + cos)/2 of different classes differ by
    a few hundredths to tenths on real features and its radius is (σ/2)·[Φ⁻¹(p̲_y) − Φ⁻¹(p̄_k)].

    **`method="vote"`** (Cohen, Rosenfeld & Kolter 2019, CERTIFY): the base classifier is
    y(x + δ) = argmax_k cos(f(x + δ), t_k) on **one** noisy copy (the tower's unit feature of that copy, not the
    smoothed mean), and the certified classifier is the vote g(x) = argmax_c P(y(x + δ) = c). `n0` selection samples
    choose ĉ_A (most votes); up to `n` estimation samples, from a separate seeded noise stream, count the votes for
    ĉ_A, and the betting confidence sequence gives p̲_A at level α ([`~statistics.vote.VoteBound`]; valid at every
    sample, so with `target_radius` sampling stops as soon as σ Φ⁻¹(p̲_A) ≥ `target_radius`). g(x') = ĉ_A for every
    ‖x' − x‖₂ < R = σ Φ⁻¹(p̲_A); abstains when p̲_A ≤ ½. Needs `bound="betting"`; takes no `alpha_split`. Only
    the K vote counts and the bound's state (one betting test per candidate value of p_A, fixed in advance) are
    kept, whatever n. Certificates record `method="vote"`, the votes `hits` among `n_used` samples and `stop`.

    The two methods certify different classifiers (the vote of single-copy predictions vs the prediction of the
    smoothed feature); on the same image they may predict different classes.

    **`method="margin"`** (FS margin): certify y(x) = argmax_k cos(f̂(x), t_k) of the smoothed feature f̂.

    With p_k(x) = (1 + ⟨f̂(x), t_k⟩)/2 for unit prototypes t_k, each p_k is the Gaussian smoothing of a [0, 1]-valued
    function, so Φ⁻¹(p_k(x + δ)) moves by at most ‖δ‖₂/σ. Hence the prediction stays y for every ‖δ‖₂ < R with

        R = (σ/2) [Φ⁻¹(p̲_y) − max_{k≠y} Φ⁻¹(p̄_k)],

    and p_y > p_k ⟺ cos(f̂, t_y) > cos(f̂, t_k) because the prototypes share the norm. y and its `RUNNER_UPS`
    closest competitors are chosen on `n0` samples; p̲_y and the p̄_k come from `n` other samples, α shared by a
    union bound fixed before those samples. `alpha_split="runner_up"` (default for this method): y, each runner-up and the group of
    all other classes get α/(`RUNNER_UPS` + 2) each; the group is bounded through E[max_{k ∈ rest} s_k] ≥ p_k (one
    [0, 1] score per sample), so the radius barely shrinks with K. `"flat"`: α/K per class (the other classes then
    use a bound from streaming moments: Hoeffding, or the smaller of Maurer–Pontil and Hoeffding). Memory does not
    grow with n · K. R holds with probability ≥ 1 − α; abstains (prediction None) when R = 0. Arguments as for
    [`certify`]; `prototypes` `(K, F)` must be finite with no zero row, or be the path of a prototypes file
    (`hf-fs prototypes`, [`save_prototypes`]), whose feature space (site and centre μ, e.g. `--center position`) the
    certificates are then made in ([`tower_in_space`]; a tensor alone carries no space); `labels` class indices in
    [0, K); `method` `"vote"` (default) or `"margin"`; `target_radius` (vote only) stops sampling once that radius
    is certified (or can no longer be within `n`), and `futility` also once p_A < Φ(R/σ) is established (an upper
    confidence sequence at level α: fewer copies on images that will not reach R; their certificates stay valid,
    with the radius the copies drawn so far certify).
    """
    seed = check_sampling(n0, n, alpha, bound, seed)
    # as Python numbers (a 0-d tensor or numpy scalar is accepted), so certificates stay JSON-serialisable
    n0, n, alpha = check_positive_int("n0", n0), check_positive_int("n", n), check_alpha(alpha)
    if alpha_split is not None and method == "vote":
        raise ValueError(f"`alpha_split={alpha_split!r}` splits α over the classes of `method='margin'`; the vote "
                         f"bounds one probability. Pass `method='margin'`, or drop `alpha_split`.")
    alpha_split = DEFAULTS["alpha_split"] if alpha_split is None else alpha_split
    check_choice("alpha_split", alpha_split, ALPHA_SPLITS)
    check_choice("method", method, PREDICTION_METHODS)
    target_radius = check_target("target_radius", target_radius, TARGET_RADIUS)
    if method == "margin" and target_radius is not None:
        raise ValueError("`target_radius` (sequential certification) is available with `method='vote'` only.")
    futility = check_futility(futility, target_radius)
    if method == "vote" and bound != "betting":
        raise ValueError(f"`method='vote'` bounds p_A with the anytime-valid betting confidence sequence; got "
                         f"`bound={bound!r}`. Use `bound='betting'` (the default).")
    space = None
    if isinstance(prototypes, (str, os.PathLike)):  # a prototypes file: its tensor and the feature space it lives in
        name = f"prototypes file {os.fspath(prototypes)}"
        prototypes, space = read_prototypes(prototypes, name)
    prototypes = check_prototypes(prototypes)
    num_classes = prototypes.shape[0]
    digest = tensors_digest({"prototypes": prototypes, "shape": torch.tensor(prototypes.shape)})  # the predictor
    tower = as_smoothed_tower(model_or_tower, sigma, autocast_dtype)
    if space is not None:
        tower = tower_in_space(tower, space, name)
    inputs_list = to_image_inputs(tower, images, input_space=input_space, image_grid_thw=image_grid_thw, image_size=image_size)
    labels = check_labels(labels, len(inputs_list), num_classes)
    _check_feature_width(tower, inputs_list, prototypes)
    if method == "vote":
        return _certify_vote(tower, inputs_list, prototypes, labels, digest, n0=n0, n=n, alpha=alpha, seed=seed,
                             target_radius=target_radius, futility=futility, progress=progress)
    dtype = compute_dtype(tower)
    runner_ups = min(RUNNER_UPS, num_classes - 1)
    alpha_y, alpha_runner_up, alpha_rest = prediction_alphas(num_classes, runner_ups, alpha, alpha_split)
    jobs = [PredictionJob(inputs, ImageNoise(tower, inputs, seed), prototypes, n0, n, runner_ups,
                           moments=alpha_split == "flat") for inputs in inputs_list]
    with tqdm(total=len(jobs), desc="certify", disable=not progress) as bar:
        run_jobs(tower, jobs, bar)
    horizon = n if bound == "betting" else None
    results = []
    for index, job in enumerate(jobs):
        kept = torch.cat(job.kept)
        y, others = job.classes[0], job.classes[1:]
        # y, its runner-ups and (runner_up split) the max over the rest, whose column bounds E[max of the rest]
        columns = kept.shape[1] if alpha_split == "runner_up" else len(job.classes)
        alphas = [alpha_y] + [alpha_runner_up] * len(others) + [alpha_rest] * (columns - 1 - len(others))
        p_lower, p_upper = class_confidence_bounds(kept[:, :columns], alphas, bound, horizon)
        if alpha_split == "flat":
            moments = job.moments.result()
            means, squares = moments[:num_classes] / n, moments[num_classes:] / n
            variances = ((squares - means.pow(2)) * n / max(n - 1, 1)).clamp_min(0.0)
            rest = sorted(set(range(num_classes)) - set(job.classes))
            p_upper += [moment_upper_bound(means[k].item(), variances[k].item(), n, alpha_rest, bound) for k in rest]
        _check_finite_result(index, p_lower=p_lower, **{f"p_upper_{k}": p for k, p in enumerate(p_upper)})
        radius = prediction_radius(p_lower, p_upper, tower.sigma)
        prediction = y if radius > 0 else None
        label = None if labels is None else labels[index]
        results.append(PredictionCertificate(
            index=index, prediction=prediction, radius=radius, p_lower=p_lower, p_upper_runner_up=max(p_upper),
            label=label, correct=None if label is None else prediction == label, sigma=tower.sigma, n0=n0, n=n,
            alpha=alpha, bound=bound, alpha_split=alpha_split, runner_ups=others,
            centered=tower.config.feature_center is not None, seed=seed, dtype=dtype,
            resolution=job.noise.resolution, prototypes_digest=digest,
        ))
    return results


def _check_feature_width(tower: SmoothedVisionTower, inputs_list: list[ImageInputs], prototypes: torch.Tensor) -> None:
    """One clean pass: the features must have the prototypes' width, checked before any noise is drawn."""
    blanks = blank_features(tower, inputs_list)
    if any(b.numel() != prototypes.shape[1] for b in blanks):
        raise ValueError(f"`prototypes` have dim {prototypes.shape[1]}, the features have "
                         f"{sorted({b.numel() for b in blanks})}.")


def _certify_vote(tower: SmoothedVisionTower, inputs_list: list[ImageInputs], prototypes: torch.Tensor, labels,
                  prototypes_digest: str, *, n0: int, n: int, alpha: float, seed: int, target_radius: float | None,
                  futility: bool, progress: bool) -> list[PredictionCertificate]:
    """`certify_prediction(method="vote")` once the arguments are checked (see there)."""
    dtype = compute_dtype(tower)
    target = None if target_radius is None else vote_target(target_radius, tower.sigma, alpha, n)
    jobs = [VoteJob(inputs, ImageNoise(tower, inputs, seed), prototypes, n0, VoteBound(alpha, n, target, futility))
            for inputs in inputs_list]
    with tqdm(total=len(jobs), desc="certify", disable=not progress) as bar:
        run_jobs(tower, jobs, bar)
    results = []
    for index, job in enumerate(jobs):
        vote = vote_result(job.top, job.bound, tower.sigma, target_radius)
        label = None if labels is None else labels[index]
        results.append(PredictionCertificate(
            index=index, prediction=vote.prediction, radius=vote.radius, p_lower=vote.p_lower,
            p_upper_runner_up=1.0 - vote.p_lower, label=label,
            correct=None if label is None else vote.prediction == label, sigma=tower.sigma, n0=n0, n=n, alpha=alpha,
            bound="betting", alpha_split="none", runner_ups=[], centered=tower.config.feature_center is not None,
            seed=seed, dtype=dtype, resolution=job.noise.resolution, method="vote", n_used=vote.n_used,
            hits=vote.hits, stop=vote.stop, target_radius=target_radius, prototypes_digest=prototypes_digest,
            futility=futility,
        ))
    return results
