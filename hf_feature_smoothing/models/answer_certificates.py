"""Certified answers of an MLLM: Cohen et al.'s CERTIFY (see [`~statistics.vote`]) for the answer a LLaVA-type or
Qwen-VL model chooses among [`CandidateAnswers`], on one prompt and one image. The base classifier is the model's candidate choice
on **one** noisy copy x + δ of the image ([0, 1] pixel space, δ ~ N(0, σ²I), no clipping): what a smoothed model with
`num_samples=1` answers (its booster, if any, conditioned on σ). The certified answer is the vote over copies."""

import contextlib
import dataclasses
import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..certification.arguments import DEFAULTS, SIGMA, TARGET_RADIUS, check_futility, check_target
from ..certification.certificates import NOISE_SPACE, strict_json, versions
from ..certification.certify import as_smoothed_tower, compute_dtype
from ..certification.inputs import check_processed, tower_device
from ..certification.sampling import ImageNoise
from ..smoothing.conditioning import noise_condition
from ..smoothing.modeling_smoothed_tower import SmoothedVisionTower
from ..smoothing.noise import SeededNoise, fresh_seed
from ..smoothing.towers import ImageInputs
from ..statistics.vote import VoteBound, top_class, vote_result, vote_target
from ..utils.tensors import tensors_digest
from ..utils.validation import check_alpha, check_positive_int, check_seed, is_class_index
from .answers import CandidateAnswers
from .booster_support import booster_support


ON_ONE_COPY = " on one noisy copy x + δ"
CONDITIONED = ", the booster conditioned on σ"
BASE_CLASSIFIER = "argmax of the candidates' branch-token logits" + ON_ONE_COPY


@dataclass
class AnswerCertificate:
    """
    Certificate of an MLLM's answer to one prompt about one image, among `candidates`. With probability ≥ 1 − `alpha`
    over the certification noise, the smoothed answer g(x') = argmax_c P(answer on x' + δ = c), δ ~ N(0, σ²I) in
    [0, 1] pixel space, is candidate `answer` for every image x' with ‖x' − x‖₂ < `radius` (same units); `answer`
    is None (abstain) when p̲_A = `p_lower` ≤ ½.

    `counts` are the votes of the `n0` selection samples (they chose the answer), `hits` the votes for it among the
    `n_used` estimation samples (at most `n`; fewer when `stop="target"`: `target_radius` was certified early,
    `"unreachable"`, or `"futile"`: with `futility`, p_A below what the target needs was established). The
    certificate names what it is about: the candidates (`candidates`, `candidates_digest`),
    the prompt (`prompt_digest`, SHA-256 of its token ids), the image (`resolution`), the model (`model`, its
    `_name_or_path` when loaded from a checkpoint; `smoothed`; `dtype`, the dtype its passes ran in: the autocast
    dtype, else its weights'; the booster `booster` and the SHA-256 of its weights `booster_digest`, None without
    one), the base classifier in words (`base_classifier`), the noise (`sigma`, `seed`, `noise_space`) and
    `batch_size`, the copies per forward pass (with the seed, what reproduces the votes: kernels may round
    differently in other batch sizes). `label` (the right candidate's index, when given) and `correct` are what
    certified accuracy counts in reports and model cards. `to_dict()` is strict JSON.
    """

    answer: int | None
    answer_text: str | None
    radius: float
    p_lower: float
    counts: list[int]
    hits: int
    n0: int
    n: int
    n_used: int
    stop: str
    alpha: float
    sigma: float
    seed: int
    target_radius: float | None
    candidates: list[str]
    candidates_digest: str
    prompt_digest: str
    resolution: list[int]
    smoothed: bool
    model: str | None = None
    dtype: str = "float32"
    booster: str | None = None
    booster_digest: str | None = None
    method: str = "vote"
    bound: str = "betting"
    base_classifier: str = BASE_CLASSIFIER
    batch_size: int | None = None
    noise_space: str = NOISE_SPACE
    versions: dict[str, str] = field(default_factory=versions)
    label: int | None = None
    correct: bool | None = None
    futility: bool = False

    def to_dict(self) -> dict:
        return strict_json(dataclasses.asdict(self))


def prompt_digest(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  image_token_id: int | None = None) -> str:
    """SHA-256 (16 hex digits) of a prompt's token ids (the attended ones). With `image_token_id` (Qwen-VL, whose
    processor gives an image as many of these tokens as its size asks), each run of it counts as one token, so
    one prompt has one digest whatever the image sizes; LLaVA prompts (a fixed run per image) are hashed as they are."""
    ids = input_ids.reshape(-1)
    if attention_mask is not None:
        ids = ids[attention_mask.reshape(-1).bool()]
    if image_token_id is not None and len(ids):
        repeated = torch.cat([torch.zeros(1, dtype=torch.bool, device=ids.device), ids[1:] == ids[:-1]])
        ids = ids[~(repeated & (ids == image_token_id))]
    return hashlib.sha256(json.dumps(ids.tolist()).encode()).hexdigest()[:16]


def booster_record(model: nn.Module) -> tuple[str | None, str | None]:
    """(name, SHA-256 (16 hex digits) of the weights) of the booster `model` runs, or (None, None): a booster held
    but disabled (`with peft_model.disable_adapter():`, `model.disable_adapters()`) or not active does not act, so
    it is not recorded; one enabled in some of its layers only is refused (no single function to name)."""
    support = booster_support()
    layers = support.layers(model)
    enabled = [not layer.disable_adapters for layer in layers]
    if any(enabled) and not all(enabled):
        raise ValueError("The model's booster is disabled in some of its layers and enabled in others, so the "
                         "certified function is neither the boosted nor the plain model; enable or disable it as a "
                         "whole (`with peft_model.disable_adapter():` certifies the model without it).")
    held = set(support.names(model))
    active = {name for layer in layers if not layer.disable_adapters for name in layer.active_adapters} & held
    prefix = support.parameter_prefix  # keys `….fs_booster_<part>.<adapter name>.…`
    state = {k: v for k, v in model.state_dict().items()
             if prefix in k and k.split(prefix, 1)[1].split(".")[1] in active}
    if not state:
        return None, None
    tower = getattr(model, "smoothed_vision_tower", None)
    recorded = getattr(getattr(tower, "config", None), "booster", None)
    name = recorded if active == held and recorded else ",".join(sorted(active))
    return name, tensors_digest(state)


@contextlib.contextmanager
def _base_classifier(model: nn.Module, tower: SmoothedVisionTower) -> Iterator[None]:
    """Inside: the model's forward is its base classifier on the pixels it is given (no smoothing hooks) with every
    booster conditioned on σ, exactly as a smoothed model's copy #1."""
    hooked = getattr(model, "smoothed_vision_tower", None)
    enabled = getattr(hooked, "enabled", None)
    if hooked is not None:
        hooked.enabled = False
    try:
        with noise_condition(tower.encoder, tower.sigma, *tower.family.pixel_stats):
            yield
    finally:
        if hooked is not None:
            hooked.enabled = enabled


def _described(inputs) -> str:
    if isinstance(inputs, Mapping):
        return f"the keys {sorted(map(str, inputs))}"
    return f"a {type(inputs).__name__}"


def _check_inputs(model: nn.Module, inputs: dict, candidates: CandidateAnswers) -> None:
    if not isinstance(candidates, CandidateAnswers):
        raise TypeError(f"`candidates` must be a `CandidateAnswers` (e.g. `CandidateAnswers.from_texts(tokenizer, "
                        f"texts)`), got {type(candidates).__name__}.")
    vocab = model.get_input_embeddings().num_embeddings if hasattr(model, "get_input_embeddings") else None
    if vocab is not None and any(not 0 <= t < vocab for ids in candidates.token_ids for t in ids):
        raise ValueError(f"`candidates` hold token ids outside this model's vocabulary [0, {vocab}): they were "
                         "tokenised for another model; build them with this model's tokenizer.")
    if not isinstance(inputs, Mapping) or "input_ids" not in inputs or "pixel_values" not in inputs:  # BatchFeature too
        raise ValueError("`inputs` must be the processor's outputs of one prompt with one image (`input_ids`, "
                         f"`attention_mask`, `pixel_values`), got {_described(inputs)}.")
    if inputs["input_ids"].ndim != 2 or inputs["input_ids"].shape[0] != 1:
        raise ValueError(f"`inputs` must hold one prompt, got `input_ids` of shape {tuple(inputs['input_ids'].shape)}.")
    pixels, grid = inputs["pixel_values"], inputs.get("image_grid_thw")
    if grid is None:
        if not torch.is_tensor(pixels) or pixels.ndim != 4:
            raise ValueError("`inputs['pixel_values']` must be `(1, 3, H, W)` (a LLaVA-type model), or patch-flattened "
                             "pixels with their `image_grid_thw` (Qwen-VL), as the processor returns them.")
        if pixels.shape[0] != 1:
            raise ValueError(f"`inputs['pixel_values']` must hold one image, got {pixels.shape[0]}: certify one image "
                             "per call.")
        return
    if not torch.is_tensor(grid) or grid.ndim != 2 or grid.shape[0] != 1:
        raise ValueError(f"`inputs['image_grid_thw']` must hold one image's `(t, h, w)`, got "
                         f"{tuple(grid.shape) if torch.is_tensor(grid) else type(grid).__name__}: certify one image "
                         "per call.")
    if not torch.is_tensor(pixels) or pixels.ndim != 2 or pixels.shape[0] != int(grid.prod()):
        raise ValueError(f"`inputs['pixel_values']` must be the {int(grid.prod())} patch rows of the image of "
                         f"`image_grid_thw` {grid.tolist()}, as the processor returns them.")


@torch.no_grad()
def certify_answer(
    model: nn.Module,
    inputs: dict,
    candidates: CandidateAnswers,
    *,
    sigma: float | None = None,
    n0: int = DEFAULTS["n0"],
    n: int = DEFAULTS["n"],
    alpha: float = DEFAULTS["alpha"],
    target_radius: float | None = None,
    batch_size: int = 16,
    seed: int | None = None,
    pad_token_id: int | None = None,
    autocast_dtype: str | None = None,
    progress: bool = False,
    label: int | None = None,
    futility: bool = False,
) -> AnswerCertificate:
    """
    Certify a LLaVA-type or Qwen-VL MLLM's answer to one prompt about one image, among `candidates` (Cohen et al.'s CERTIFY).

    The base classifier is the model's choice among the candidates ([`CandidateAnswers.scores`]: one forward pass
    per batch of copies scores them all) on one noisy copy x + δ, δ ~ N(0, σ²I) in [0, 1] pixel space (no clipping), the booster (if
    any) conditioned on σ: what a smoothed model with `num_samples=1` answers. `n0` selection copies choose the answer
    ĉ_A (most votes); up to `n` estimation copies count its votes, and the betting confidence sequence bounds
    p_A = P(answer on x + δ = ĉ_A) from below at level α (valid at every copy: with `target_radius`, sampling stops
    once σ Φ⁻¹(p̲_A) ≥ `target_radius`). The smoothed answer is ĉ_A within ‖δ‖₂ < σ Φ⁻¹(p̲_A); abstains when
    p̲_A ≤ ½. `batch_size` copies share a forward pass; only vote counts are kept, so memory does not grow with n.

    Noise is seeded with the package's scheme: copy i of stream `"selection"` / `"estimation"` depends only on
    (`seed`, image, stream, i), so a seed makes the certificate reproducible (up to the batch invariance of the model's
    kernels); `None` draws a fresh seed, recorded.

    Args:
        model (`nn.Module`): a LLaVA-type or Qwen-VL MLLM: stock (then `sigma` is required), smoothed, or smoothed
            with a booster (its smoothing hooks are bypassed: each copy is one forward pass).
        inputs (`dict`): processor outputs of **one** prompt with **one** image (`input_ids`, `attention_mask`,
            `pixel_values` `(1, 3, H, W)`; Qwen-VL: patch-flattened `pixel_values`, `image_grid_thw` and
            `mm_token_type_ids`); the prompt ends where the answer starts.
        candidates ([`CandidateAnswers`]): the answers (scored by their branch token's logit when they differ at
            one token, else by their teacher-forced log-likelihood; `candidates.base_classifier` says which).
        sigma (`float`, *optional*): noise level in [0, 1] pixel units; defaults to a smoothed model's σ.
        n0 (`int`, *optional*, defaults to 64): selection copies.
        n (`int`, *optional*, defaults to 1000): estimation copies (the most drawn with a target).
        alpha (`float`, *optional*, defaults to 0.001): failure probability of the certificate.
        target_radius (`float`, *optional*): stop as soon as this radius ([0, 1] pixel ℓ2) is certified, or can
            no longer be within `n`.
        futility (`bool`, *optional*, defaults to `False`): with `target_radius`, also stop as soon as p_A < Φ(R/σ)
            is established at level α (an upper confidence sequence, [`~statistics.vote.VoteBound`]): copies are no
            longer spent on answers that will not reach the target. The certificate stays valid; its radius is then
            what the copies drawn so far certify, below the target (smaller than `n` copies would give).
        batch_size (`int`, *optional*, defaults to 16): noisy copies per forward pass.
        seed (`int`, *optional*): the noise seed.
        pad_token_id (`int`, *optional*): padding id (defaults to the model config's, else 0).
        autocast_dtype (`str`, *optional*): `"bfloat16"` / `"float16"` runs the whole forward passes (tower and
            language model) under autocast (default: a smoothed model's own `autocast_dtype`, which in the model
            itself covers only its tower passes; else the weights' dtype; `"float32"` turns a smoothed model's own
            autocast off; refused on half-precision weights); the certificate then covers the model *as computed
            in that dtype* (recorded as `dtype`). bfloat16 is 2–3× faster on CPUs with AMX and on GPUs, and much
            slower where it is emulated (a warning says so).
        progress (`bool`, *optional*): show a progress bar over copies.
        label (`int`, *optional*): the index of the right candidate, recorded with `correct` (whether the certified
            answer is it): what certified accuracy in reports and model cards counts.
    """
    _check_inputs(model, inputs, candidates)
    if label is not None and not is_class_index(label, len(candidates.texts)):
        raise ValueError(f"`label` must be the index of the right candidate, an integer in [0, "
                         f"{len(candidates.texts)}), got {label!r}.")
    n0, n, alpha = check_positive_int("n0", n0), check_positive_int("n", n), check_alpha(alpha)
    batch_size = check_positive_int("batch_size", batch_size)
    seed = check_seed(seed)
    seed = fresh_seed() if seed is None else seed
    smoothed = isinstance(getattr(model, "smoothed_vision_tower", None), SmoothedVisionTower)
    if sigma is None and not smoothed:
        raise ValueError("`sigma` is required for a stock model (the noise level in [0, 1] pixel units, e.g. 0.25); "
                         "a smoothed model uses its own σ by default.")
    if sigma is not None:
        sigma = SIGMA.check("sigma", sigma)
    target_radius = check_target("target_radius", target_radius, TARGET_RADIUS)
    tower = as_smoothed_tower(model, sigma, autocast_dtype)  # validates the dtype; the model is not modified
    dtype = compute_dtype(tower)
    device = tower_device(tower)  # the noise is drawn, and autocast set, where the tower runs
    inputs = {key: value.to(device) if torch.is_tensor(value) else value for key, value in inputs.items()}
    autocast = (contextlib.nullcontext() if tower.config.autocast_dtype is None
                else torch.autocast(device.type, dtype=getattr(torch, dtype)))
    target = None if target_radius is None else vote_target(target_radius, tower.sigma, alpha, n)
    futility = check_futility(futility, target_radius)
    if pad_token_id is None:
        config = getattr(model.config, "text_config", model.config)
        pad_token_id = getattr(config, "pad_token_id", None) or 0
    image_inputs = ImageInputs(inputs["pixel_values"], inputs.get("image_grid_thw"))
    check_processed(tower, image_inputs, hint="Pass the model's processor outputs, or")  # σ is in [0, 1] pixels
    noise = ImageNoise(tower, image_inputs, seed)
    prefixed, positions = candidates.with_prefix(inputs, pad_token_id)  # with Qwen-VL's mm_token_type_ids

    def votes(source: SeededNoise, start: int, count: int) -> torch.Tensor:
        copies = tower.add_noise(image_inputs, count, source=source, start=start)
        batch = {key: value.expand(count, -1) for key, value in prefixed.items()}
        with autocast:
            scores = candidates.scores(model, batch, positions.expand(count), copies.pixel_values,
                                       copies.image_grid_thw)
        return scores.argmax(1).cpu()

    counts = torch.zeros(len(candidates.texts), dtype=torch.long)
    bound = VoteBound(alpha, n, target, futility)
    with tqdm(total=n0 + n, desc="certify_answer", disable=not progress) as bar, _base_classifier(model, tower):
        for start in range(0, n0, batch_size):
            count = min(batch_size, n0 - start)
            counts += torch.bincount(votes(noise.selection, start, count), minlength=counts.numel())
            bar.update(count)
        top = top_class(counts)
        start = 0
        while not bound.done:
            count = min(batch_size, n - start)
            bound.update(votes(noise.estimation, start, count) == top)
            start += count
            bar.update(count)
    result = vote_result(top, bound, tower.sigma, target_radius)
    booster, booster_digest = booster_record(model)
    return AnswerCertificate(
        answer=result.prediction,
        answer_text=None if result.prediction is None else candidates.texts[result.prediction],
        radius=result.radius, p_lower=result.p_lower, counts=counts.tolist(), hits=result.hits, n0=n0, n=n,
        n_used=result.n_used, stop=result.stop, alpha=alpha, sigma=tower.sigma, seed=seed, target_radius=target_radius,
        candidates=list(candidates.texts), candidates_digest=candidates.digest(),
        prompt_digest=prompt_digest(inputs["input_ids"], inputs.get("attention_mask"),
                                    None if image_inputs.image_grid_thw is None else model.config.image_token_id),
        resolution=noise.resolution,
        smoothed=smoothed, model=getattr(model.config, "_name_or_path", None) or None,
        dtype=dtype, booster=booster,
        booster_digest=booster_digest, batch_size=batch_size,
        base_classifier=candidates.base_classifier + ON_ONE_COPY + (CONDITIONED if booster_digest else ""),
        label=None if label is None else int(label), correct=None if label is None else result.prediction == label,
        futility=futility,
    )


__all__ = ["AnswerCertificate", "booster_record", "certify_answer", "prompt_digest"]
