"""`GSBTrainer`: trains only the booster of a frozen tower (and frozen language model) with 🤗 `Trainer`."""

import os
from collections.abc import Sequence

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import Trainer, TrainingArguments

from ..smoothing.configuration_feature_smoothing import FeatureSmoothingConfig
from ..smoothing.towers.processor import processor_settings
from ..utils.logging import get_logger
from .data import EpochCallback, GSBCollator, RandomCropFlip
from .layer import booster_layers
from .loading import record_smoothing, save_booster_adapter
from .loss import GSBLoss
from .registration import PARAMETER_PREFIX


logger = get_logger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
PARTS = ("mapper", "purifier")


STATS = ("image_mean", "image_std")
PIXEL_FIELDS = (*STATS, "image_processor")  # the smoothing fields that define the pixel space of training


def pixel_space(model: nn.Module, processing_class=None) -> dict:
    """The pixel space the training noise lives in: its mean/std and the resize / crop that makes it
    (`image_processor`), each the smoothed model's own (what it was loaded with and certifies at), else the
    processor's, else none (the tower resolves the statistics: [`~towers.processor.resolve_pixel_stats`]; images
    are centre-cropped squares). A processor that normalises differently from the smoothed model's own config is
    refused: the booster would be trained in another space."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    config = getattr(getattr(base, "smoothed_vision_tower", None), "config", None)
    own = {k: [float(v) for v in getattr(config, k)] for k in STATS
           if config is not None and getattr(config, k) is not None}
    if config is not None and config.image_processor:
        own["image_processor"] = config.image_processor
    processor = processor_settings(processing_class) if processing_class is not None else {}
    differing = [k for k in STATS if k in own and k in processor
                 and any(abs(a - b) > 1e-6 for a, b in zip(own[k], processor[k]))]
    if differing:
        raise ValueError(
            "`processing_class` normalises images differently from the smoothed model: "
            + ", ".join(f"{k} {processor[k]} vs the model's {own[k]}" for k in differing)
            + ". Pass the model's own processor, or `smoothing={'image_mean': ..., 'image_std': ...}` explicitly."
        )
    return {**processor, **own}


def _pixel_fields(smoothing: FeatureSmoothingConfig | dict) -> FeatureSmoothingConfig:
    """The pixel space of a `smoothing=` argument; other fields, which training does not use, are named in a
    warning when they are set."""
    given = smoothing.to_dict() if isinstance(smoothing, FeatureSmoothingConfig) else dict(smoothing)
    defaults = FeatureSmoothingConfig().to_dict()
    unused = {k: v for k, v in given.items() if k not in PIXEL_FIELDS and k in defaults and v != defaults[k]}
    if unused:
        logger.warning(f"GSBTrainer reads only {PIXEL_FIELDS} from `smoothing`; not used: {unused} (σ is drawn from "
                       "`sigmas`, one per step).")
    return FeatureSmoothingConfig.from_dict({k: v for k, v in given.items() if k in PIXEL_FIELDS})


class GSBTrainer(Trainer):
    """
    [`~transformers.Trainer`] for a Gaussian Smoothness Booster: everything but the booster is frozen (checked after
    every step: a gradient on any other parameter raises), the loss is [`GSBLoss`], and checkpoints / `save_model`
    write only the PEFT adapter (`adapter_config.json` + `adapter_model.safetensors`). Progress bar, logging (the loss
    terms as `gsb_*`), checkpoints and `resume_from_checkpoint` are `Trainer`'s; under `accelerate launch` / `torchrun`
    it trains with DDP, and σ, noise and augmentation depend only on (seed, step / epoch, image), so N processes
    train the booster one process would with the same global batch.

    Args:
        model (`PeftModel` or `PreTrainedModel`):
            A supported tower or MLLM with a booster attached ([`add_booster`], or in place with
            `hf_feature_smoothing.booster.inject_booster`).
        args (`TrainingArguments`, *optional*):
            As for `Trainer`; `remove_unused_columns` is ignored (the collator reads the image column). `args.seed`
            seeds σ, the noise and the augmentation.
        train_dataset, eval_dataset (`datasets.Dataset`, *optional*):
            Rows with an image column, optionally text for the LM term (formats: `hf_feature_smoothing.booster.data`).
        sigmas (`Sequence[float]`, *optional*):
            Noise levels σ (pixel [0, 1] units), one drawn per step; defaults to the active booster's config
            `sigmas`. Others replace them in that config (what the saved booster records it was trained for).
        noise_samples (`int`, *optional*, defaults to 2):
            Noisy copies per image and step.
        lambda_clean (`float`, *optional*, defaults to 1.0), lambda_stats (`float`, *optional*, defaults to 0.1),
        lambda_pixel (`float`, *optional*, defaults to 1.0), lambda_lm (`float`, *optional*, defaults to 0.0),
        lambda_consistency (`float`, *optional*, defaults to 1.0):
            Weights of the terms of [`GSBLoss`] (`lambda_pixel` acts only with a purifier; `lambda_lm` > 0 puts the
            frozen projector and language model in the loop and needs text rows; `lambda_consistency=lambda_clean=
            lambda_stats=0` pretrains a purifier on the pixel term alone, without running the tower).
        image_size (`int`, *optional*):
            Resize/crop size of the collator; defaults to the tower's (unused for prompt / answer rows: the processor
            sizes those).
        image_column (`str`, *optional*, defaults to `"image"`):
            Dataset column holding the images.
        smoothing (`FeatureSmoothingConfig` or `dict`, *optional*):
            The pixel space: `image_mean` / `image_std` and the resize / crop `image_processor` (other fields are not
            used, and named in a warning when set). Defaults to the smoothed model's own (`model.smoothing_config`),
            else `processing_class`'s, else the tower family's statistics (with a warning) and square centre crops; a
            processor that disagrees with the smoothed model's own statistics is refused.
        processing_class (`ProcessorMixin`, *optional*):
            The MLLM's processor, for `prompt` / `answer` rows (and the default mean/std).
        crop_scale (`tuple[float, float]`, *optional*, defaults to `(0.5, 1.0)`), flip (`bool`, *optional*,
        defaults to `True`):
            Seeded random square crops and horizontal flips ([`RandomCropFlip`]); `crop_scale=None, flip=False`
            disables augmentation.
        trainable (`Sequence[str]`, *optional*, defaults to `("mapper", "purifier")`):
            The booster parts that train; the others stay frozen (e.g. `("mapper",)` on top of a pretrained purifier:
            then no gradient flows through the tower, as in the paper's two-stage recipe).
        kwargs:
            Passed on to `Trainer` (`callbacks`, `optimizers`, `data_collator`, ...).

    Example (multi-GPU: `accelerate launch --num_processes 8 train.py`, same global batch as
    `per_device_train_batch_size × 8` on one process):

    ```python
    booster = add_booster(model, GSBConfig(sigmas=[0.25, 0.5], purifier=True, mapper_mixing="attention"))
    GSBTrainer(booster, TrainingArguments("out", max_steps=1000), train_dataset=dataset).train()
    ```
    """

    def __init__(self, model: nn.Module, args: TrainingArguments | None = None, train_dataset=None,
                 eval_dataset=None, sigmas: Sequence[float] | None = None, noise_samples: int = 2,
                 lambda_clean: float = 1.0, lambda_stats: float = 0.1, lambda_pixel: float = 1.0,
                 lambda_lm: float = 0.0, lambda_consistency: float = 1.0, image_size: int | None = None,
                 image_column: str = "image",
                 smoothing: FeatureSmoothingConfig | dict | None = None, processing_class=None,
                 crop_scale: tuple[float, float] | None = (0.5, 1.0), flip: bool = True,
                 trainable: Sequence[str] = PARTS, **kwargs):
        layers = booster_layers(model)
        if not layers:
            raise ValueError("`model` has no booster: attach one with `add_booster(model)` (or `inject_booster(model, "
                             "GSBConfig())`) before training.")
        unknown = sorted(set(trainable) - set(PARTS))
        if unknown or not trainable:
            raise ValueError(f"`trainable` must name booster parts among {PARTS}, got {trainable!r}.")
        self.trained_prefixes = tuple(f".{PARAMETER_PREFIX}{part}." for part in trainable)
        for name, param in model.named_parameters():
            param.requires_grad_(any(prefix in name for prefix in self.trained_prefixes))
        self.booster_model = model
        config = getattr(model, "peft_config", {}).get(self._active_booster())
        if sigmas is None:
            sigmas = config.sigmas if config is not None else [0.25]
        if args is None:
            args = TrainingArguments(output_dir="tmp_trainer")
        smoothing = pixel_space(model, processing_class) if smoothing is None else _pixel_fields(smoothing)
        loss = GSBLoss(model, sigmas, noise_samples, lambda_clean, lambda_stats, smoothing, lambda_pixel=lambda_pixel,
                       lambda_lm=lambda_lm, lambda_consistency=lambda_consistency, seed=args.seed)
        if config is not None and list(config.sigmas) != loss.sigmas:  # the saved config says what it was trained for
            logger.info(f"Training booster `{self._active_booster()}` for σ in {loss.sigmas} (its config said "
                        f"{config.sigmas}); its config now records them.")
            config.sigmas = list(loss.sigmas)
            for layer in layers:
                layer.trained_sigmas[self._active_booster()] = tuple(loss.sigmas)
        augment = RandomCropFlip(args.seed, crop_scale, flip) if crop_scale is not None or flip else None
        if augment is not None and args.dataloader_persistent_workers and args.dataloader_num_workers > 0:
            raise ValueError("`dataloader_persistent_workers=True` keeps the collator of the first epoch in its workers, "
                             "so augmentations would repeat every epoch; set it to False (or `crop_scale=None, "
                             "flip=False`).")
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
        if "data_collator" not in kwargs:
            kwargs["data_collator"] = GSBCollator(loss.tower.family, image_size, image_column, augment,
                                                  processing_class, pad)
        if isinstance(kwargs["data_collator"], GSBCollator):
            kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), EpochCallback(kwargs["data_collator"])]
        super().__init__(model=loss, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, **kwargs)

    def _remove_unused_columns(self, dataset, description=None):
        return dataset  # the collator reads the image column

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = model(**inputs)
        return (loss, None) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.accelerator.unwrap_model(model).step = self.state.global_step  # seeds σ and the noise of this step
        loss = super().training_step(model, inputs, num_items_in_batch)
        leaked = [n for n, p in self.booster_model.named_parameters()
                  if p.grad is not None and not any(prefix in n for prefix in self.trained_prefixes)]
        if leaked:
            raise RuntimeError(f"Only the booster's trainable parts may be trained, but these got gradients: {leaked[:5]}.")
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        self.accelerator.unwrap_model(model).step = self.state.global_step
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            return model(**inputs).detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        terms = getattr(self.accelerator.unwrap_model(self.model), "last_terms", {})
        if "loss" in logs:
            logs = {**logs, **{f"gsb_{k}": round(v, 5) for k, v in terms.items()}}
        super().log(logs, start_time)

    def _active_booster(self) -> str:
        """The name of the booster being trained (the active adapter of its layers)."""
        return booster_layers(self.booster_model)[0].active_adapters[0]

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:
            return
        from peft import PeftModel

        output_dir = output_dir or self.args.output_dir
        record_smoothing(self.booster_model.peft_config[self._active_booster()], self.booster_model)  # as it is now
        if isinstance(self.booster_model, PeftModel):
            self.booster_model.save_pretrained(output_dir, safe_serialization=True)
        else:  # layers injected in place: PEFT's files, without transformers' adapter integration
            save_booster_adapter(self.booster_model, output_dir, self._active_booster())

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        from peft import set_peft_model_state_dict

        path = os.path.join(resume_from_checkpoint, ADAPTER_WEIGHTS)
        if not os.path.isfile(path):
            raise ValueError(f"`resume_from_checkpoint`={resume_from_checkpoint!r} has no {ADAPTER_WEIGHTS}.")
        result = set_peft_model_state_dict(self.booster_model, load_file(path), adapter_name=self._active_booster())
        missing = [k for k in result.missing_keys if PARAMETER_PREFIX in k]
        if missing:
            raise ValueError(f"Checkpoint {resume_from_checkpoint!r} lacks booster weights {missing[:5]}.")

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)


GSBImageCollator = GSBCollator  # the name of earlier versions
