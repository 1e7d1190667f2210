"""`SmoothedVisionTower`: the Monte Carlo smoothed encoder f̂(x) = E[f(x + δ)], δ ~ N(0, σ²I) in pixel space."""

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..utils.deprecation import warn_renamed
from ..utils.validation import check_images, check_positive_int, check_seed
from .conditioning import noise_condition
from .configuration_feature_smoothing import FeatureSmoothingConfig
from .hub_io import hub_io
from .mllm_hooks import EPS, MLLMHooksMixin, SmoothedCall
from .noise import SeededNoise, image_fingerprint
from .towers import ImageInputs, TowerFamily, get_tower_family


def check_booster_attached(model: nn.Module, config: FeatureSmoothingConfig) -> None:
    """Refuse a config that names a booster `model` does not hold: the tower would run without it while its config
    (and any checkpoint saved from it) claims it. A booster is attached by loading, not by naming it here."""
    adapters = getattr(model, "peft_config", None) or {}
    boosters = [name for name, adapter in adapters.items()
                if getattr(getattr(adapter, "peft_type", None), "name", None) == "FEATURE_BOOSTER"]
    # a smoothed MLLM's own tower: the booster its config saved (`booster_config`) is attached right after
    own = getattr(getattr(model, "config", None), "feature_smoothing", None) is config
    if boosters or (config.booster is None and config.booster_config is None) or (own and config.booster_config):
        return
    if config.booster is None:
        raise ValueError(
            "`config.booster_config` describes a booster but the model holds none: the tower would run without it. "
            "It is written by `save_pretrained`; load the saved tower with `SmoothedVisionTower.from_pretrained`, "
            "or leave `booster_config` out of the config."
        )
    raise ValueError(
        f"`config.booster` is {config.booster!r} but the model holds no booster: a tower built directly does not "
        "load one, and its config must not claim it. Load the booster first (`load_booster(model, "
        f"{config.booster!r})`), or build the tower with `SmoothedVisionTower.from_pretrained(checkpoint, "
        f"smoothing={{'booster': {config.booster!r}}})`; or leave `booster` out of the config."
    )


@dataclass
class NoisyCopies:
    """`count` copies of **one** image for [`SmoothedVisionTower.unit_features_batch`]: noisy with samples
    `start .. start + count − 1` of `source`, or clean when `source` is None."""

    inputs: ImageInputs
    count: int
    source: SeededNoise | None = None
    start: int = 0


def _request_noise(request: "NoisyCopies"):
    """The noise of a [`NoisyCopies`] request for `TowerFamily.noisy_copies` (`None`: clean copies)."""
    if request.source is None:
        return None
    return lambda image: request.source.sample(request.start, request.count, tuple(image.shape), image.device)


class SmoothedVisionTower(MLLMHooksMixin, nn.Module):
    """
    Feature-space Smoothing of a vision tower.

    For every image x the base feature f(x) is the tower's feature at the *feature site* (see
    [`FeatureSmoothingConfig.smoothed_features`]) flattened over the image's tokens and normalised to unit ℓ2 norm as
    one vector. The smoothed feature is the Monte Carlo mean f̂(x) ≈ (1/n) Σᵢ f(x + δᵢ) with δᵢ ~ N(0, σ²I) drawn in
    [0, 1] pixel space and mapped through the processor's mean/std, `chunk_size` images per tower call.

    With `config.feature_center` = μ (per feature channel, or per token position and channel for fixed-resolution
    towers; see [`~certification.estimate_feature_mean`]), the primary site's base feature is normalise(f − μ)
    instead (a per-channel μ subtracted from every token, a per-position one position by position): certificates then speak
    about the centred direction, which is not dominated by the direction all images share.

    Called directly, it returns f̂ per image. [`~SmoothedVisionTower.install`] hooks it into an MLLM so that the
    language model receives smoothed features: the model's own tower call sees noisy copy #1, the feature-site hook
    runs the other n − 1 copies and substitutes the direction of f̂ scaled to the mean raw feature norm (cosine
    certificates are scale-invariant, and the projector keeps the feature scale it was trained on). With a feature
    centre μ the primary site receives μ + direction(f̂) · mean‖f(x + δ) − μ‖: the centred average mapped back to the
    raw feature space, so the language model reads features of the usual location and scale.

    Args:
        model (`nn.Module`):
            A supported transformers model (see `hf_feature_smoothing.smoothing.towers.TOWER_FAMILIES`).
        config (`FeatureSmoothingConfig` or `dict`, *optional*):
            Smoothing parameters; defaults to `FeatureSmoothingConfig()`.
    """

    def __init__(self, model: nn.Module, config: FeatureSmoothingConfig | dict | None = None):
        super().__init__()
        self.config = FeatureSmoothingConfig.from_dict(config or {})
        check_booster_attached(model, self.config)
        self.family: TowerFamily = get_tower_family(model, self.config)
        self.encoder = self.family.model
        self.enabled = True
        self._generators: dict[tuple[torch.device, int], torch.Generator] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._call: SmoothedCall | None = None

    @property
    def sigma(self) -> float:
        return self.config.sigma

    # ----- noise -------------------------------------------------------------------------------------------------
    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.config.seed is None:
            return None
        key = (device, self.config.seed)  # a seed edited in the config starts its own stream, as a fresh tower would
        if key not in self._generators:
            self._generators = {k: g for k, g in self._generators.items() if k[1] == self.config.seed}
            self._generators[key] = torch.Generator(device=device).manual_seed(self.config.seed)
        return self._generators[key]

    @property
    def adapter(self) -> TowerFamily:
        """Deprecated alias of [`family`] (0.1.0 called the tower integration an adapter)."""
        warn_renamed("SmoothedVisionTower", "adapter", "family")
        return self.family

    def manual_seed(self, seed: int | None) -> "SmoothedVisionTower":
        """Reseed the noise of the forward pass (`None`: fresh noise from the global RNG from now on)."""
        self.config.seed = check_seed(seed)
        self._generators.clear()
        return self

    def noise_streams(self, inputs: ImageInputs, seed: int, *streams: str) -> list[SeededNoise]:
        """The seeded noise streams named `streams` of the one image in `inputs` (their samples depend on the seed,
        the image's pixels and the stream's name only; the image is fingerprinted once), to feed [`add_noise`]."""
        fingerprint = image_fingerprint(self.family.to_image(inputs))
        return [SeededNoise(seed, fingerprint, stream) for stream in streams]

    def add_noise(
        self,
        inputs: ImageInputs,
        copies: int,
        sigma: float | None = None,
        source: SeededNoise | None = None,
        start: int = 0,
    ) -> ImageInputs:
        """`copies` noisy copies of every image (copies-major), noise N(0, σ²) on the [0, 1] pixel image, drawn in
        one batched call on the inputs' device: from the tower's forward-pass generator, or samples
        `start .. start + copies − 1` of `source` (one image only) when given."""
        if source is not None and inputs.num_images != 1:
            raise ValueError(f"A `SeededNoise` source feeds one image, got {inputs.num_images}.")

        def noise(image: torch.Tensor) -> torch.Tensor:
            if source is not None:
                return source.sample(start, copies, tuple(image.shape), image.device)
            return torch.randn((copies, *image.shape), generator=self._generator(image.device), device=image.device,
                               dtype=image.dtype)

        return self.family.noisy_copies(inputs, copies, self.sigma if sigma is None else sigma, noise)

    # ----- base features ------------------------------------------------------------------------------------------
    def _segments(self, inputs: ImageInputs, num_rows: int, device: torch.device) -> torch.Tensor:
        counts = torch.tensor(self.family.rows_per_image(inputs, num_rows), device=device)
        return torch.repeat_interleave(torch.arange(len(counts), device=device), counts)

    def _unit_rows(self, rows: torch.Tensor, inputs: ImageInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """`(copies, R, F)` site rows → rows of the per-image unit vectors, and the per-image norms `(copies, B)`."""
        seg = self._segments(inputs, rows.shape[1], rows.device)
        squares = torch.zeros(rows.shape[0], inputs.num_images, device=rows.device, dtype=rows.dtype)
        norms = squares.index_add(1, seg, rows.pow(2).sum(-1)).sqrt()
        return rows / norms[:, seg, None].clamp_min(EPS), norms

    def _center(self, rows: torch.Tensor, sign: float = -1.0, channels: int | None = None) -> torch.Tensor:
        """Primary-site rows `(..., W)` with the feature centre μ subtracted (`sign=-1`) or added back (`+1`) on every
        token: rows whose width W is a multiple of len(μ) hold W / len(μ) tokens (one: a per-position μ, as wide as
        an image's row). `channels` per token: default, those of the family's last `encode`. No centre: unchanged."""
        if self.config.feature_center is None:
            return rows
        center = torch.tensor(self.config.feature_center, dtype=rows.dtype, device=rows.device)
        width, channels = rows.shape[-1], channels or self.family.primary_channels or rows.shape[-1]
        # per position (a whole row) or per channel; a per-position μ is never tiled over more tokens than it had
        if center.numel() not in (width, channels):
            raise ValueError(
                f"`feature_center` has {center.numel()} values, but the primary feature site gives {channels} "
                f"channels per token and rows of {width} values: it was estimated for another model, or per position "
                f"on images of another size; estimate it for this model and size with "
                f"`estimate_feature_mean(model, images)`."
            )
        tokens = rows.reshape(*rows.shape[:-1], width // center.numel(), center.numel())
        return (tokens + sign * center).reshape(rows.shape)

    def _site_rows(self, inputs: ImageInputs, copies: int) -> list[torch.Tensor]:
        """Encode `copies`-fold inputs; every site as float `(copies, R, F)`, the primary one centred. One copy of
        more than `chunk_size` images is encoded `chunk_size` images per tower call."""
        chunk = self.config.chunk_size
        if copies == 1 and inputs.num_images > chunk:
            images = self.family.split(inputs)
            groups = [self._site_rows(ImageInputs.concat(images[i : i + chunk]), 1) for i in range(0, len(images), chunk)]
            return [torch.cat(parts, dim=1) for parts in zip(*groups)]
        sites = [rows.float().view(copies, -1, rows.shape[-1]) for rows in self.family.encode(inputs)]
        return [*sites[:-1], self._center(sites[-1])]

    def feature_channels(self, inputs: ImageInputs) -> int:
        """Channel width of the primary site's raw features (the last dimension before the tower family flattens an
        image's tokens into rows), measured with one clean pass of `inputs`."""
        widths: list[int] = []
        as_rows = self.family.as_rows

        def spy(features: torch.Tensor) -> torch.Tensor:
            widths.append(features.shape[-1])
            return as_rows(features)

        self.family.as_rows = spy  # instance attribute: shadows the method for this pass only
        try:
            with self._compute_context(inputs.pixel_values.device):
                rows = self.family.encode(inputs)[-1]
        finally:
            del self.family.as_rows
        return widths[-1] if widths else rows.shape[-1]

    @contextlib.contextmanager
    def _compute_context(self, device: torch.device):
        with contextlib.ExitStack() as stack:
            stack.enter_context(noise_condition(self.encoder, self.sigma, *self.family.pixel_stats))  # condition on σ
            if not torch.is_grad_enabled():
                stack.enter_context(torch.inference_mode())
            if self.config.autocast_dtype is not None:
                stack.enter_context(torch.autocast(device.type, dtype=getattr(torch, self.config.autocast_dtype)))
            yield

    def iter_unit_features(
        self, inputs: ImageInputs, num_samples: int, noise: bool = True, source: SeededNoise | None = None
    ) -> Iterator[list[torch.Tensor]]:
        """Yield, chunk by chunk, the unit-normalised features of noisy copies of **one** image: a list (one per
        site, primary last) of `(copies, F)` tensors. Noise comes from `source` when given (reproducible), else from
        the forward-pass generator. Used by certification and attacks."""
        if inputs.num_images != 1:
            raise ValueError(f"`iter_unit_features` takes one image, got {inputs.num_images}.")
        chunk = self.config.chunk_size
        for start in range(0, num_samples, chunk):
            copies = min(chunk, num_samples - start)
            if noise:
                batch = self.add_noise(inputs, copies, source=source, start=start)
            else:
                clean = inputs.pixel_values.repeat(copies, *([1] * (inputs.pixel_values.ndim - 1)))
                batch = self.family.repeat(inputs, copies).with_pixels(clean)
            with self._compute_context(inputs.pixel_values.device):
                sites = self._site_rows(batch, copies)
                yield [self._unit_rows(rows, inputs)[0].flatten(1) for rows in sites]

    def clean_unit_features(self, inputs: ImageInputs) -> list[torch.Tensor]:
        """Unit-normalised base features f(x) of one clean image, one `(F,)` tensor per site (primary last)."""
        return [site[0] for site in next(self.iter_unit_features(inputs, 1, noise=False))]

    def unit_features_batch(self, requests: Sequence[NoisyCopies]) -> list[list[torch.Tensor]]:
        """
        Unit base features of copies of several images in **one** tower call (Σ count ≤ `chunk_size` is the caller's
        choice): per request, a list (one per site, primary last) of `(count, F)` tensors. Each image's noise comes
        from its own `source`, so its features do not depend on what else is in the batch (up to the kernels'
        batch invariance). All images must share the pixel layout (`pixel_values.shape[1:]`).
        """
        batch = ImageInputs.concat([self.family.noisy_copies(request.inputs, request.count, self.sigma,
                                                             _request_noise(request)) for request in requests])
        with self._compute_context(batch.pixel_values.device):
            sites = [rows.float() for rows in self.family.encode(batch)]
            sites[-1] = self._center(sites[-1])
            outputs: list[list[torch.Tensor]] = [[] for _ in requests]
            for rows in sites:
                unit = self._unit_rows(rows[None], batch)[0][0]  # every copy is one image of `batch`
                per_copy = self.family.rows_per_image(batch, rows.shape[0])
                copy = offset = 0
                for index, request in enumerate(requests):
                    size = sum(per_copy[copy : copy + request.count])
                    outputs[index].append(unit[offset : offset + size].reshape(request.count, -1))
                    copy, offset = copy + request.count, offset + size
        return outputs

    # ----- smoothing -----------------------------------------------------------------------------------------------
    def monte_carlo(self, inputs: ImageInputs, num_samples: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per site: the sum over `num_samples` noisy copies of the unit feature rows `(R, F)` and of the per-image
        raw norms `(B,)`, computed `chunk_size` images per tower call (more images than that: one copy at a time, its
        images in groups of `chunk_size`)."""
        sums: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        per_call = max(1, self.config.chunk_size // inputs.num_images)
        device = inputs.pixel_values.device
        with self._compute_context(device):
            for start in range(0, num_samples, per_call):
                copies = min(per_call, num_samples - start)
                parts = []
                for rows in self._site_rows(self.add_noise(inputs, copies), copies):
                    unit, norms = self._unit_rows(rows, inputs)
                    parts.append((unit.sum(0), norms.sum(0)))
                sums = parts if sums is None else [(u + pu, n + pn) for (u, n), (pu, pn) in zip(sums, parts)]
        if sums is not None and torch.is_inference(sums[0][0]):
            sums = [(u.clone(), n.clone()) for u, n in sums]  # leave inference mode: downstream may need autograd
        return sums or []

    def forward(
        self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None, num_samples: int | None = None
    ) -> tuple[torch.Tensor, ...]:
        """
        Smoothed features f̂(x) of the primary feature site, one flattened `(F,)` vector per image (norm ≤ 1).

        Args:
            pixel_values (`torch.Tensor`):
                Processed pixel values, as the model's image processor returns them.
            image_grid_thw (`torch.Tensor`, *optional*):
                Required by Qwen-VL towers.
            num_samples (`int`, *optional*):
                Monte Carlo samples (≥ 1); `None` (default) uses `config.num_samples`.
        """
        inputs = self.check_inputs(pixel_values, image_grid_thw)
        # `None` only means the config's value: 0 is refused, never replaced by the default
        n = self.config.num_samples if num_samples is None else check_positive_int("num_samples", num_samples)
        unit_sum, _ = self.monte_carlo(inputs, n)[-1]
        mean = unit_sum / n
        counts = self.family.rows_per_image(inputs, mean.shape[0])
        return tuple(part.flatten() for part in mean.split(counts))

    def check_inputs(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None) -> ImageInputs:
        """Validate user inputs (finite floats, right rank) and wrap them."""
        patch_flattened = hasattr(self.family, "_patch")
        check_images("pixel_values", pixel_values, 2 if patch_flattened else 4)
        self.family.check_channels("pixel_values", pixel_values)
        if patch_flattened and image_grid_thw is None:
            raise ValueError("`image_grid_thw` is required for Qwen-VL towers (the processor returns it).")
        return ImageInputs(pixel_values, image_grid_thw)

    # ----- Hub checkpoints (implemented above the core, see `register_hub_io`) ------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, smoothing=None, **kwargs) -> "SmoothedVisionTower":
        """
        Load a smoothed tower from a folder or Hub repo: a stand-alone encoder (DINOv2, ViT, CLIP / SigLIP vision
        model), a supported MLLM (stock: its smoothed model type is loaded; smoothed: as saved), or a folder written
        by [`~SmoothedVisionTower.save_pretrained`].

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): folder or Hub repo id.
            smoothing (`dict` or `FeatureSmoothingConfig`, *optional*): overrides of the saved smoothing (only the
                fields it sets); processor statistics and resize settings come from the checkpoint's processor config.
                `smoothing_config=` is the same argument under transformers' `*_config=` naming.
            kwargs: as for `from_pretrained` in transformers (`revision`, `subfolder`, `cache_dir`, `dtype`, ...).
        """
        return hub_io("load_tower")(cls, pretrained_model_name_or_path, smoothing=smoothing, **kwargs)

    def save_pretrained(self, save_directory, **kwargs):
        """Save atomically with a model card (see `hub.save_certified`, which takes `certificates=` and
        `push_to_hub=`): a smoothed MLLM's tower as the smoothed model, any other encoder as its stock files plus
        `feature_smoothing.json` (and its booster in `booster/`). Reload with `SmoothedVisionTower.from_pretrained`."""
        return hub_io("save_with_card")(self, save_directory, **kwargs)

    def _save_pretrained_raw(self, save_directory, **kwargs) -> None:
        hub_io("save_tower_files")(self, save_directory, **kwargs)
