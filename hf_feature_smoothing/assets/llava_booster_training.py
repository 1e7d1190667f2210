"""A Gaussian Smoothness Booster for the real-weight `llava-dinov2-smollm2`, trained with tower, projector and
language model frozen, in two stages (the paper's v1 recipe: purifier first, then the rest):

1. `purifier`: a σ-conditioned pixel purifier on the pixel term alone (denoise the noisy [0, 1] image; the tower
   does not run);
2. `features` or `lm`: purifier + attention-mixing mapper trained together from the stage-1 purifier on the feature
   terms (consistency, clean, stats) and the pixel term; `lm` adds the frozen language model in the loop (KL between
   its answer distribution for clean stock features and for boosted noisy features), `features` does not. Both use
   the same data, steps, seeds and every other setting, so they compare the loss and nothing else.

The `mapper` variant is the earlier booster for comparison: a token-wise mapper alone (no purifier, no token mixing)
trained on the feature terms with the same stage-2 settings.

Training data: the training splits the projector was aligned on (1400 digits, 600 textiles) as prompt / answer rows.
Every stage runs under 🤗 `Trainer` through [`GSBTrainer`] (progress bar, logging, checkpoints) and resumes from its
last checkpoint; a finished stage is never retrained. The booster ships with the package
(`llava_dinov2_smollm2_gsb/`, the `lm` variant): `load_booster(model, LLAVA_BOOSTER)`."""

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..utils.atomic import write_atomically
from ..utils.locking import RunLock
from ..utils.logging import get_logger
from ..version import __version__
from .training_folder import check_settings, last_checkpoint


logger = get_logger(__name__)

LLAVA_BOOSTER = Path(__file__).parent / "llava_dinov2_smollm2_gsb"  # the shipped adapter folder
VARIANTS = ("mapper", "features", "lm")
RECORD_FILE = "training_record.json"


@dataclass
class LlavaBoosterRecipe:
    """Every setting of the two stages (recorded with the trained adapter in `training_record.json`)."""

    sigmas: list[float] = field(default_factory=lambda: [0.12, 0.25, 0.5])
    smoothing_sigma: float = 0.25  # the smoothing recorded in the adapter: restored when loaded into a stock model
    smoothing_samples: int = 8
    purifier: dict = field(default_factory=lambda: {"width": 48, "depth": 6, "scale": 2})
    hidden_dim: int = 512
    mixing_heads: int = 6
    purifier_steps: int = 400
    purifier_batch_size: int = 16
    purifier_learning_rate: float = 2e-3
    steps: int = 300
    batch_size: int = 8
    learning_rate: float = 1e-3
    noise_samples: int = 2
    lambda_clean: float = 1.0
    lambda_stats: float = 0.1
    lambda_pixel: float = 1.0
    lambda_lm: float = 1.0  # the `lm` variant only
    crop_scale: tuple[float, float] = (0.85, 1.0)  # mild crops; no flips (a flipped digit is another glyph)
    seed: int = 0


def training_rows():
    """The prompt / answer rows of the projector's training splits, as a `datasets.Dataset`."""
    import datasets

    from .labelled_images import digit_examples, textile_examples
    from .llava_dinov2_smollm2 import prompt_text
    from .projector_training import answer_text

    examples = digit_examples("train") + textile_examples("train")
    return datasets.Dataset.from_dict({"image": [e.image for e in examples],
                                       "prompt": [prompt_text(e.question) for e in examples],
                                       "answer": [answer_text(e) for e in examples]})


def _write_json(path: Path, data: dict) -> None:
    write_atomically(path, json.dumps(data, indent=1))


def _finished(output: Path) -> dict | None:
    """The cost record of a finished stage in `output`, else `None`."""
    if (output / "adapter_model.safetensors").exists() and (output / RECORD_FILE).exists():
        return json.loads((output / RECORD_FILE).read_text())["cost"][-1]
    return None


def _train_stage(name: str, output: Path, booster, processor, rows, steps: int, batch_size: int,
                 learning_rate: float, recipe: LlavaBoosterRecipe, **loss_kwargs) -> dict:
    """Train (or resume) one stage; the adapter lands in `output`. Returns the stage's cost record."""
    from transformers import TrainingArguments

    from ..booster import GSBTrainer

    args = TrainingArguments(
        output_dir=str(output / "checkpoints"), max_steps=steps, per_device_train_batch_size=batch_size,
        learning_rate=learning_rate, lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20),
        logging_steps=max(1, steps // 30), save_strategy="steps", save_steps=max(1, steps // 10), save_total_limit=1,
        use_cpu=True, report_to=[], seed=recipe.seed, dataloader_drop_last=True,
    )
    trainer = GSBTrainer(booster, args, train_dataset=rows, processing_class=processor,
                         noise_samples=recipe.noise_samples, crop_scale=recipe.crop_scale, flip=False, **loss_kwargs)
    checkpoint = last_checkpoint(output / "checkpoints")
    start, load = time.time(), os.getloadavg()[0]
    metrics = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None).metrics
    booster.save_pretrained(str(output))
    cost = {"stage": name, "steps": steps, "seconds": round(time.time() - start, 1),
            "train_runtime": round(metrics.get("train_runtime", 0.0), 1), "resumed": checkpoint is not None,
            "load_average": round((load + os.getloadavg()[0]) / 2, 2),
            "final_terms": {k: v for k, v in trainer.state.log_history[-2].items() if k.startswith("gsb_")}
            if len(trainer.state.log_history) > 1 else {}}
    return cost


def train_llava_booster(output_dir: str | os.PathLike, variant: str = "lm",
                        recipe: LlavaBoosterRecipe | None = None) -> Path:
    """
    Train the booster of `llava-dinov2-smollm2` (stage 1 `output_dir/purifier`, shared by the purifier variants;
    stage 2 `output_dir/<variant>`) and return the stage-2 adapter folder, whose `training_record.json` holds the recipe,
    the training cost of both stages and the versions. Resumable: rerun the same call after an interruption.

    Args:
        output_dir (`str` or `os.PathLike`): where the stages, their checkpoints and the adapters go.
        variant (`str`, *optional*, defaults to `"lm"`): `"lm"` (frozen language model in the loop),
            `"features"` (feature terms only) or `"mapper"` (the token-wise mapper alone, feature terms only).
        recipe (`LlavaBoosterRecipe`, *optional*): the settings; a finished stage trained with another recipe is
            refused, naming the differing settings.
    """
    if variant not in VARIANTS:
        raise ValueError(f"`variant` must be one of {VARIANTS}, got {variant!r}.")
    recipe = recipe or LlavaBoosterRecipe()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(output_dir):  # a second trainer of the same folder fails at once, naming the holder
        check_settings(output_dir, asdict(recipe))
        return _train(output_dir, variant, recipe)


def _train(output_dir: Path, variant: str, recipe: LlavaBoosterRecipe) -> Path:
    import torch
    from peft import PeftModel
    from transformers import AutoProcessor

    from ..booster import GSBConfig, add_booster
    from ..models import SmoothedLlavaForConditionalGeneration
    from .llava_dinov2_smollm2 import llava_checkpoint

    torch.manual_seed(recipe.seed)
    folder = llava_checkpoint()
    processor = AutoProcessor.from_pretrained(folder)
    smoothing = {"sigma": recipe.smoothing_sigma, "num_samples": recipe.smoothing_samples}

    def base():
        return SmoothedLlavaForConditionalGeneration.from_pretrained(folder, smoothing=smoothing).eval()

    stage2 = output_dir / variant
    if _finished(stage2) is not None:
        return stage2
    rows = training_rows()
    stage2_kwargs = dict(lambda_clean=recipe.lambda_clean, lambda_stats=recipe.lambda_stats,
                         lambda_pixel=recipe.lambda_pixel, lambda_lm=recipe.lambda_lm if variant == "lm" else 0.0)
    if variant == "mapper":  # the token-wise booster alone: no purifier stage
        booster = add_booster(base(), GSBConfig(sigmas=recipe.sigmas, hidden_dim=recipe.hidden_dim))
        costs = [_train_stage(variant, stage2, booster, processor, rows, recipe.steps, recipe.batch_size,
                              recipe.learning_rate, recipe, **stage2_kwargs)]
        return _finish(stage2, variant, recipe, costs)
    stage1 = output_dir / "purifier"
    purifier_cost = _finished(stage1)
    if purifier_cost is None:
        config = GSBConfig(sigmas=recipe.sigmas, hidden_dim=recipe.hidden_dim, mapper_mixing="attention",
                                      mixing_heads=recipe.mixing_heads, purifier=recipe.purifier)
        purifier_cost = _train_stage("purifier", stage1, add_booster(base(), config), processor, rows,
                                     recipe.purifier_steps, recipe.purifier_batch_size, recipe.purifier_learning_rate,
                                     recipe, lambda_consistency=0.0, lambda_clean=0.0, lambda_stats=0.0,
                                     lambda_pixel=1.0, trainable=("purifier",))
        _finish(stage1, "purifier", recipe, [purifier_cost])
    booster = PeftModel.from_pretrained(base(), stage1, is_trainable=True)
    cost = _train_stage(variant, stage2, booster, processor, rows, recipe.steps, recipe.batch_size,
                        recipe.learning_rate, recipe, **stage2_kwargs)
    return _finish(stage2, variant, recipe, [purifier_cost, cost])


def _finish(folder: Path, variant: str, recipe: LlavaBoosterRecipe, costs: list[dict]) -> Path:
    import torch

    record = {"variant": variant, "recipe": asdict(recipe), "cost": costs, "hf_feature_smoothing": __version__,
              "torch": torch.__version__}
    _write_json(folder / RECORD_FILE, record)
    return folder

