"""`GSBTrainer`: trains only the booster of a frozen tower (and frozen language model) with 🤗 `Trainer`."""

import os
from collections.abc import Sequence

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import Trainer, TrainingArguments

from ..configuration_feature_smoothing import FeatureSmoothingConfig
from ..errors import check_finite_positive, check_positive_int
from ..logging_utils import get_logger
from ..modeling_smoothed_tower import SmoothedVisionTower
from ..towers import ImageInputs
from .layer import booster_layers, booster_noise_level
from .registration import PARAMETER_PREFIX


logger = get_logger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"


class GSBImageCollator:
    """Batches of dataset rows (an image column of PIL images or HWC uint8 arrays) → processed tower inputs."""

    def __init__(self, tower: SmoothedVisionTower, image_size: int | None = None, image_column: str = "image"):
        self.adapter, self.image_size, self.image_column = tower.adapter, image_size, image_column

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        from PIL import Image

        if not rows or self.image_column not in rows[0]:
            raise KeyError(f"Rows need an `{self.image_column}` column (pass `image_column=`), got {list(rows[0]) if rows else rows}.")
        images = [r[self.image_column] if isinstance(r[self.image_column], Image.Image)
                  else Image.fromarray(torch.as_tensor(r[self.image_column]).numpy()) for r in rows]
        inputs = self.adapter.preprocess(images, self.image_size)
        batch = {"pixel_values": inputs.pixel_values}
        if inputs.image_grid_thw is not None:
            batch["image_grid_thw"] = inputs.image_grid_thw
        return batch


class GSBLoss(nn.Module):
    """
    The GSB objective as a module (so `Trainer` / accelerate wrap it and DDP syncs the booster gradients). For a
    batch of clean images x, a noise level σ drawn from `sigmas` and k noisy copies x + δ, with f the un-boosted
    feature (the booster at σ = 0 is the identity) and f_σ the boosted one, all per image and unit-normalised:

        L = E[1 − cos(f_σ(x + δ), f(x))]                (consistency: raises S; the paper's l_rb)
          + λ_clean · E[1 − cos(f_σ(x), f(x))]          (utility: clean features stay what the LM expects)
          + λ_stats · l_stats                           (utility: per-channel batch mean/std of f_σ match f's)

    l_stats is divided by the mean per-channel variance of the clean features, so it is scale-free.
    """

    def __init__(self, model: nn.Module, sigmas: Sequence[float], noise_samples: int, lambda_clean: float,
                 lambda_stats: float, smoothing: FeatureSmoothingConfig):
        super().__init__()
        self.model = model
        object.__setattr__(self, "tower", SmoothedVisionTower(model, smoothing))  # helper only, not a submodule
        self.sigmas = [check_finite_positive("sigmas", float(s)) for s in sigmas]
        self.noise_samples = check_positive_int("noise_samples", noise_samples)
        self.lambda_clean, self.lambda_stats = float(lambda_clean), float(lambda_stats)
        self.last_terms: dict[str, float] = {}

    def _cosines(self, rows: torch.Tensor, target: torch.Tensor, inputs: ImageInputs) -> torch.Tensor:
        """Per-image cosine of `(copies, R, F)` rows with `(R, F)` target rows → `(copies, B)`."""
        unit, _ = self.tower._unit_rows(rows, inputs)
        unit_target, _ = self.tower._unit_rows(target[None], inputs)
        dots = (unit * unit_target).sum(-1)
        seg = self.tower._segments(inputs, rows.shape[1], rows.device)
        return torch.zeros(rows.shape[0], inputs.num_images, device=rows.device).index_add(1, seg, dots)

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        adapter, inputs, k = self.tower.adapter, ImageInputs(pixel_values, image_grid_thw), self.noise_samples
        sigma = self.sigmas[int(torch.randint(len(self.sigmas), ()))]
        with torch.no_grad(), booster_noise_level(self.model, 0.0):
            target = adapter.encode(inputs)[-1].float()
        noisy = self.tower.add_noise(inputs, k, sigma)
        batch = adapter.repeat(inputs, k + 1)
        batch = batch.with_pixels(torch.cat([pixel_values, noisy.pixel_values]))
        with booster_noise_level(self.model, sigma):
            rows = adapter.encode(batch)[-1].float().view(k + 1, *target.shape)
        cosines = self._cosines(rows, target, inputs)
        consistency, clean = (1 - cosines[1:]).mean(), (1 - cosines[0]).mean()
        boosted = rows.flatten(0, 1)
        scale = target.var(0, unbiased=False).mean().clamp_min(1e-12)
        stats = ((boosted.mean(0) - target.mean(0)).pow(2).mean()
                 + (boosted.std(0, unbiased=False) - target.std(0, unbiased=False)).pow(2).mean()) / scale
        loss = consistency + self.lambda_clean * clean + self.lambda_stats * stats
        self.last_terms = {"sigma": sigma, "consistency": consistency.item(), "clean": clean.item(),
                           "stats": stats.item(), "score": 1 - consistency.item() / 2}
        return loss


class GSBTrainer(Trainer):
    """
    [`~transformers.Trainer`] for a Gaussian Smoothness Booster: everything but the booster is frozen (checked after
    every step: a gradient on any other parameter raises), the loss is [`GSBLoss`], and checkpoints / `save_model`
    write only the PEFT adapter (`adapter_config.json` + `adapter_model.safetensors`).

    Args:
        model (`PeftModel` or `PreTrainedModel`):
            A supported tower or MLLM with a booster attached ([`add_booster`] or `model.add_adapter`).
        args (`TrainingArguments`, *optional*):
            As for `Trainer`; `remove_unused_columns` is ignored (the image column is needed).
        train_dataset, eval_dataset (`datasets.Dataset`, *optional*):
            Rows with an image column (PIL images, e.g. a `datasets.Image` feature).
        sigmas (`Sequence[float]`, *optional*):
            Noise levels σ (pixel [0, 1] units) drawn per step; defaults to the booster config's `sigmas`.
        noise_samples (`int`, *optional*, defaults to 2):
            Noisy copies per image and step.
        lambda_clean (`float`, *optional*, defaults to 1.0), lambda_stats (`float`, *optional*, defaults to 0.1):
            Weights of the utility terms of [`GSBLoss`].
        image_size (`int`, *optional*):
            Resize/crop size of the collator; defaults to the tower's.
        image_column (`str`, *optional*, defaults to `"image"`):
            Dataset column holding the images.
        smoothing (`FeatureSmoothingConfig`, *optional*):
            Processor mean/std (and chunking) of the tower; defaults to the family's.
        kwargs:
            Passed on to `Trainer` (`callbacks`, `optimizers`, ...).
    """

    def __init__(self, model: nn.Module, args: TrainingArguments | None = None, train_dataset=None,
                 eval_dataset=None, sigmas: Sequence[float] | None = None, noise_samples: int = 2,
                 lambda_clean: float = 1.0, lambda_stats: float = 0.1, image_size: int | None = None,
                 image_column: str = "image", smoothing: FeatureSmoothingConfig | dict | None = None, **kwargs):
        layers = booster_layers(model)
        if not layers:
            raise ValueError("`model` has no booster: attach one with `add_booster(model)` (or `model.add_adapter("
                             "FeatureBoosterConfig())`) before training.")
        for name, param in model.named_parameters():
            param.requires_grad_(PARAMETER_PREFIX in name)
        if sigmas is None:
            configs = getattr(model, "peft_config", {})
            sigmas = next(iter(configs.values())).sigmas if configs else [0.25]
        smoothing = FeatureSmoothingConfig.from_dict(smoothing or {})
        self.booster_model = model
        loss = GSBLoss(model, sigmas, noise_samples, lambda_clean, lambda_stats, smoothing)
        kwargs.setdefault("data_collator", GSBImageCollator(loss.tower, image_size, image_column))
        super().__init__(model=loss, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset, **kwargs)

    def _remove_unused_columns(self, dataset, description=None):
        return dataset  # the collator reads the image column

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = model(**inputs)
        return (loss, None) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        leaked = [n for n, p in self.booster_model.named_parameters() if p.grad is not None and PARAMETER_PREFIX not in n]
        if leaked:
            raise RuntimeError(f"Only booster parameters may be trained, but these got gradients: {leaked[:5]}.")
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            return model(**inputs).detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        terms = getattr(self.accelerator.unwrap_model(self.model), "last_terms", {})
        if "loss" in logs:
            logs = {**logs, **{f"gsb_{k}": round(v, 5) for k, v in terms.items()}}
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if self.args.should_save:
            self.booster_model.save_pretrained(output_dir or self.args.output_dir, safe_serialization=True)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        from peft import set_peft_model_state_dict

        path = os.path.join(resume_from_checkpoint, ADAPTER_WEIGHTS)
        if not os.path.isfile(path):
            raise ValueError(f"`resume_from_checkpoint`={resume_from_checkpoint!r} has no {ADAPTER_WEIGHTS}.")
        active = self.booster_model.active_adapter
        name = active() if callable(active) else active
        name = name[0] if isinstance(name, list) else name
        result = set_peft_model_state_dict(self.booster_model, load_file(path), adapter_name=name)
        missing = [k for k in result.missing_keys if PARAMETER_PREFIX in k]
        if missing:
            raise ValueError(f"Checkpoint {resume_from_checkpoint!r} lacks booster weights {missing[:5]}.")

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)
