"""`GSBLoss`: the booster's training objective, with the frozen language model optionally in the loop."""

import contextlib
import random
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..smoothing.configuration_feature_smoothing import FeatureSmoothingConfig
from ..smoothing.modeling_smoothed_tower import SmoothedVisionTower
from ..smoothing.noise import derive_digest, image_fingerprint
from ..smoothing.towers import ImageInputs
from ..utils.validation import check_positive_int, check_seed, check_sigma
from .layer import GSBPurifierLayer, booster_layers, booster_noise_level


def _nonnegative(name: str, value: float) -> float:
    value = float(value)
    if not value >= 0:
        raise ValueError(f"`{name}` must be a weight ≥ 0, got {value!r}.")
    return value


@contextlib.contextmanager
def smoothing_disabled(model: nn.Module) -> Iterator[None]:
    """Run a smoothed MLLM as its stock model inside the block (the trainer draws its own noise)."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    tower = getattr(base, "smoothed_vision_tower", None)
    enabled = getattr(tower, "enabled", None)
    if tower is not None:
        tower.enabled = False
    try:
        yield
    finally:
        if tower is not None:
            tower.enabled = enabled


class GSBLoss(nn.Module):
    """
    The GSB objective as a module (so `Trainer` / accelerate wrap it and DDP syncs the booster gradients). For a
    batch of clean images x, a noise level σ drawn from `sigmas` and k noisy copies x + δ, with f the stock feature
    (every booster is the identity at σ = 0) and f_σ the boosted one (purifier on the noisy pixels, mapper on the
    features), all per image and unit-normalised:

        L = λ_cons · E[1 − cos(f_σ(x + δ), f(x))]              (consistency: raises S; the paper's l_rb)
          + λ_clean · E[1 − cos(f_σ(x), f(x))]                 (utility: clean features stay what the LM expects)
          + λ_stats · l_stats                                  (utility: per-channel batch mean/std of f_σ match f's)
          + λ_pixel · E‖P_σ(x + δ) − x‖² / d                   (purifier only: denoise in [0, 1] pixel space)
          + λ_lm · E_answer tokens[KL(p_LM(· | f(x)) ‖ p_LM(· | f_σ(x + δ₁)))]   (LM in the loop, see below)

    l_stats is divided by the mean per-channel variance of the clean features, so it is scale-free (under DDP it is
    computed per process, like BatchNorm without sync). The LM term runs the frozen projector and language model on
    the batch's `input_ids` with clean stock pixels (the teacher, no gradient) and with the first noisy copy through
    the boosters, and takes the KL of the next-token distributions at the answer positions (`labels` ≠ −100),
    teacher-forced; gradients reach only the booster. The pixel term calls the purifier on the noisy pixels directly
    (one extra purifier pass, no tower pass).

    σ and the noise are functions of (`seed`, the training step, the image), never of the process or the batch
    composition: a distributed run draws exactly what one process with the same global batch draws.

    Args:
        model (`nn.Module`): the model with the booster (a `PeftModel` or a transformers model with the adapter).
        sigmas (`Sequence[float]`): noise levels to draw from, one per step.
        noise_samples (`int`): noisy copies k per image.
        lambda_clean, lambda_stats, lambda_pixel, lambda_lm, lambda_consistency (`float`): weights of the terms above;
            with all feature weights (consistency, clean, stats) 0 the tower does not run (purifier pretraining).
        smoothing (`FeatureSmoothingConfig`): processor mean/std of the pixel space the noise lives in.
        seed (`int`, *optional*, defaults to 0): seed of σ and the noise.
    """

    accepts_loss_kwargs = False  # the loss is a per-image mean: Trainer scales it for gradient accumulation itself

    def __init__(self, model: nn.Module, sigmas: Sequence[float], noise_samples: int, lambda_clean: float,
                 lambda_stats: float, smoothing: FeatureSmoothingConfig, lambda_pixel: float = 1.0,
                 lambda_lm: float = 0.0, lambda_consistency: float = 1.0, seed: int = 0):
        super().__init__()
        self.model = model
        object.__setattr__(self, "tower", SmoothedVisionTower(model, smoothing))  # helper only, not a submodule
        self.sigmas = [check_sigma(s, "sigmas") for s in sigmas]
        self.noise_samples = check_positive_int("noise_samples", noise_samples)
        self.lambda_consistency = _nonnegative("lambda_consistency", lambda_consistency)
        self.lambda_clean = _nonnegative("lambda_clean", lambda_clean)
        self.lambda_stats = _nonnegative("lambda_stats", lambda_stats)
        self.lambda_pixel = _nonnegative("lambda_pixel", lambda_pixel)
        self.lambda_lm = _nonnegative("lambda_lm", lambda_lm)
        self.seed, self.step = check_seed(seed), 0
        self.last_terms: dict[str, float] = {}

    @property
    def pixel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return self.tower.family.pixel_stats

    def sigma_at(self, step: int) -> float:
        return self.sigmas[random.Random(f"{self.seed}|sigma|{step}").randrange(len(self.sigmas))]

    def noisy_copies(self, inputs: ImageInputs, copies: int, sigma: float, step: int) -> ImageInputs:
        """`copies` noisy copies of every image (copies-major); image i's noise is a function of (seed, step,
        image i) only."""
        adapter = self.tower.family

        def noise(image: torch.Tensor) -> torch.Tensor:
            parts = []
            for one in adapter.split(inputs):
                pixels = adapter.to_image(one)
                # the top 63 bits of the digest (not `derive_seed`'s low 63): the training noise of existing seeds
                digest = derive_digest(self.seed, "gsb-train", step, fingerprint=image_fingerprint(pixels))
                generator = torch.Generator(device=pixels.device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)
                parts.append(torch.randn((copies, *pixels.shape), generator=generator, device=pixels.device))
            return torch.cat(parts, dim=1)

        return adapter.noisy_copies(inputs, copies, sigma, noise)

    def _cosines(self, rows: torch.Tensor, target: torch.Tensor, inputs: ImageInputs) -> torch.Tensor:
        """Per-image cosine of `(copies, R, F)` rows with `(R, F)` target rows → `(copies, B)`."""
        unit, _ = self.tower._unit_rows(rows, inputs)
        unit_target, _ = self.tower._unit_rows(target[None], inputs)
        dots = (unit * unit_target).sum(-1)
        seg = self.tower._segments(inputs, rows.shape[1], rows.device)
        return torch.zeros(rows.shape[0], inputs.num_images, device=rows.device).index_add(1, seg, dots)

    def _pixel_term(self, purifiers: list[GSBPurifierLayer], clean: ImageInputs, noisy: ImageInputs,
                    sigma: float) -> torch.Tensor:
        """Mean squared [0, 1] error of the purified noisy copies against the clean images."""
        copies = noisy.pixel_values.shape[0] // clean.pixel_values.shape[0]
        errors = []
        with booster_noise_level(self.model, sigma, *self.pixel_stats):
            for layer in purifiers:
                purified = layer.to_unit(layer.purify(noisy.pixel_values, noisy.image_grid_thw))
                target = layer.to_unit(clean.pixel_values).repeat(copies, *[1] * (clean.pixel_values.ndim - 1))
                errors.append((purified - target).pow(2).mean())
        return torch.stack(errors).mean()

    def _lm_term(self, clean: ImageInputs, noisy: ImageInputs, sigma: float, labels: torch.Tensor,
                 text_inputs: dict) -> torch.Tensor:
        answer = labels[:, 1:] != -100  # logits at t predict token t + 1
        if not answer.any():
            raise ValueError("The batch has no answer tokens (`labels` ≠ −100); the LM term needs some.")
        positions = answer.any(0).nonzero().flatten()
        mask = answer[:, positions].float()

        def logits(inputs: ImageInputs) -> torch.Tensor:
            return self.model(**text_inputs, **inputs.model_kwargs(), logits_to_keep=positions).logits.float()

        with smoothing_disabled(self.model):
            with torch.no_grad(), booster_noise_level(self.model, 0.0):
                teacher = torch.log_softmax(logits(clean), dim=-1)
            with booster_noise_level(self.model, sigma, *self.pixel_stats):
                student = torch.log_softmax(logits(noisy), dim=-1)
        kl = (teacher.exp() * (teacher - student)).sum(-1)
        return (kl * mask).sum() / mask.sum()

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None,
                input_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                **text_inputs) -> torch.Tensor:
        adapter, inputs, k = self.tower.family, ImageInputs(pixel_values, image_grid_thw), self.noise_samples
        sigma = self.sigma_at(self.step)
        noisy = self.noisy_copies(inputs, k, sigma, self.step)
        loss, terms = pixel_values.new_zeros((), dtype=torch.float32), {"sigma": sigma}
        if self.lambda_consistency + self.lambda_clean + self.lambda_stats > 0:
            with torch.no_grad(), booster_noise_level(self.model, 0.0):
                target = adapter.encode(inputs)[-1].float()
            batch = adapter.repeat(inputs, k + 1).with_pixels(torch.cat([pixel_values, noisy.pixel_values]))
            with booster_noise_level(self.model, sigma, *self.pixel_stats):
                rows = adapter.encode(batch)[-1].float().view(k + 1, *target.shape)
            cosines = self._cosines(rows, target, inputs)
            consistency, clean = (1 - cosines[1:]).mean(), (1 - cosines[0]).mean()
            boosted = rows.flatten(0, 1)
            scale = target.var(0, unbiased=False).mean().clamp_min(1e-12)
            stats = ((boosted.mean(0) - target.mean(0)).pow(2).mean()
                     + (boosted.std(0, unbiased=False) - target.std(0, unbiased=False)).pow(2).mean()) / scale
            loss = self.lambda_consistency * consistency + self.lambda_clean * clean + self.lambda_stats * stats
            terms.update(consistency=consistency.item(), clean=clean.item(), stats=stats.item(),
                         score=1 - consistency.item() / 2)
        purifiers = [m for m in booster_layers(self.model) if isinstance(m, GSBPurifierLayer)]
        if self.lambda_pixel > 0 and purifiers:
            pixel = self._pixel_term(purifiers, inputs, noisy, sigma)
            loss = loss + self.lambda_pixel * pixel
            terms["pixel"] = pixel.item()
        if self.lambda_lm > 0:
            if input_ids is None or labels is None:
                raise ValueError("`lambda_lm` > 0 needs text: rows with `prompt` / `answer` (and `processing_class`) or "
                                 "pre-tokenised `input_ids` + `labels`.")
            first = noisy.with_pixels(noisy.pixel_values[: pixel_values.shape[0]])
            if first.image_grid_thw is not None:
                first = ImageInputs(first.pixel_values, image_grid_thw)
            lm = self._lm_term(inputs, first, sigma, labels, {"input_ids": input_ids, **text_inputs})
            loss = loss + self.lambda_lm * lm
            terms["lm_kl"] = lm.item()
        if torch.is_grad_enabled() and not loss.requires_grad:
            raise ValueError("No term of the loss reaches this booster's weights (`lambda_pixel` needs a purifier, the "
                             "feature terms the tower); raise `lambda_consistency` / `lambda_clean` / `lambda_lm`.")
        self.last_terms = terms
        return loss
