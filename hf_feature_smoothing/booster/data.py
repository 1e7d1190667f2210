"""Training data for the booster: images from any `datasets` image column, seeded random crops / flips, and (for
the language-model utility term) prompt / answer text or pre-tokenised `input_ids` + `labels`.

Row formats (one dict per dataset row):

* image only: `{image_column: image}`, the image a PIL image, an HWC uint8 array or tensor, a file path, or a
  `datasets.Image(decode=False)` dict (`{"bytes": ..., "path": ...}`);
* with a processor (`processing_class`): `{image_column: image, "prompt": str, "answer": str}`; the prompt holds the
  model's image placeholder (e.g. LLaVA's `"USER: <image>\\nWhat is this? ASSISTANT:"`), the answer what the language
  model should say (add the EOS token yourself if it should be trained on); labels are the answer tokens;
* pre-tokenised: `{image_column: image, "input_ids": [...], "labels": [...]}` (`labels` −100 outside the answer, image
  placeholder tokens already expanded to the tower's token count at `image_size`); other integer lists as long as
  `input_ids` (e.g. Qwen3-VL's `mm_token_type_ids`) are padded along with it.
"""

import math
import random
from collections.abc import Sequence

import torch
from transformers import TrainerCallback

from ..smoothing.noise import derive_digest
from ..smoothing.towers import TowerFamily
from ..utils.images import load_image
from ..utils.validation import SEED


IMAGE_KEYS = ("pixel_values", "image_grid_thw", "image_sizes")
IGNORE_INDEX = -100


class RandomCropFlip:
    """
    Random square crop (side a uniform fraction in `crop_scale` of the short side, uniform position) and horizontal
    flip with probability ½. The draw for an image is a function of (`seed`, `epoch`, the image's pixels) only, so a
    resumed run and every process of a distributed run augment a row exactly as one uninterrupted process would.

    Args:
        seed (`int`): seed of the augmentation.
        crop_scale (`tuple[float, float]`, *optional*, defaults to `(0.5, 1.0)`): crop side range; `None` disables.
        flip (`bool`, *optional*, defaults to `True`): random horizontal flips.
    """

    def __init__(self, seed: int, crop_scale: tuple[float, float] | None = (0.5, 1.0), flip: bool = True):
        if crop_scale is not None and not (0 < crop_scale[0] <= crop_scale[1] <= 1):
            raise ValueError(f"`crop_scale` must satisfy 0 < low ≤ high ≤ 1, got {crop_scale!r}.")
        self.seed, self.crop_scale, self.flip = SEED.check("seed", seed), crop_scale, bool(flip)

    def __call__(self, image, epoch: int):
        rng = random.Random(derive_digest(self.seed, epoch, image.size, fingerprint=image.tobytes()))
        if self.crop_scale is not None:
            short = min(image.size)
            side = max(1, round(short * rng.uniform(*self.crop_scale)))
            left, top = rng.randint(0, image.width - side), rng.randint(0, image.height - side)
            image = image.crop((left, top, left + side, top + side))
        if self.flip and rng.random() < 0.5:
            image = image.transpose(0)  # Image.Transpose.FLIP_LEFT_RIGHT
        return image


def _pad(sequences: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    length = max(len(s) for s in sequences)
    return torch.tensor([list(s) + [value] * (length - len(s)) for s in sequences], dtype=torch.long)


class GSBCollator:
    """
    Dataset rows → a training batch for [`GSBLoss`] (see the module docstring for the row formats). Images go
    through `augment` (seeded by `epoch`, which [`GSBTrainer`] sets at every epoch) and then the tower family's
    resize / centre-crop / normalisation at `image_size`, or through `processor` for prompt / answer rows.

    Args:
        adapter (`TowerFamily`): the tower family (preprocessing and normalisation).
        image_size (`int`, *optional*): resize / crop size; defaults to the tower's.
        image_column (`str`, *optional*, defaults to `"image"`): the image column.
        augment (`RandomCropFlip`, *optional*): augmentation; `None` disables it.
        processor (`ProcessorMixin`, *optional*): the MLLM's processor, needed for `prompt` / `answer` rows.
        pad_token_id (`int`, *optional*, defaults to 0): padding of `input_ids`.
    """

    def __init__(self, adapter: TowerFamily, image_size: int | None = None, image_column: str = "image",
                 augment: RandomCropFlip | None = None, processor=None, pad_token_id: int = 0):
        self.family, self.image_size, self.image_column = adapter, image_size, image_column
        self.augment, self.processor, self.pad_token_id = augment, processor, int(pad_token_id)
        self.epoch = 0

    def _images(self, rows: list[dict]) -> list:
        if not rows or self.image_column not in rows[0]:
            raise KeyError(f"Rows need an `{self.image_column}` column (pass `image_column=`), got "
                           f"{list(rows[0]) if rows else rows}.")
        images = [load_image(row[self.image_column], self.image_column) for row in rows]
        return [self.augment(image, self.epoch) for image in images] if self.augment is not None else images

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        images = self._images(rows)
        if "prompt" in rows[0] or "answer" in rows[0]:
            return self._prompt_answer(rows, images)
        inputs = self.family.preprocess(images, self.image_size)
        batch = inputs.model_kwargs()
        if "input_ids" in rows[0]:
            batch.update(self._tokenised(rows))
        return batch

    def _tokenised(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if "labels" not in rows[0]:
            raise KeyError("Pre-tokenised rows need `labels` (the answer tokens, −100 elsewhere) next to `input_ids`.")
        out = {"input_ids": _pad([r["input_ids"] for r in rows], self.pad_token_id),
               "labels": _pad([r["labels"] for r in rows], IGNORE_INDEX),
               "attention_mask": _pad([[1] * len(r["input_ids"]) for r in rows], 0)}
        for key, value in rows[0].items():  # other token-aligned columns, e.g. `mm_token_type_ids`
            if key not in out and isinstance(value, (list, tuple)) and len(value) == len(rows[0]["input_ids"]):
                out[key] = _pad([r[key] for r in rows], 0)
        return out

    def _prompt_answer(self, rows: list[dict], images: list) -> dict[str, torch.Tensor]:
        if self.processor is None:
            raise ValueError("Rows with `prompt` / `answer` need the model's processor: pass `processing_class=` to "
                             "GSBTrainer (or pre-tokenise them into `input_ids` + `labels`).")
        tokens: dict[str, list] = {}
        pixels: dict[str, list] = {}
        labels = []
        for row, image in zip(rows, images):
            full = self.processor(images=[image], text=[row["prompt"] + row["answer"]], return_tensors="pt")
            prompt_length = self.processor(images=[image], text=[row["prompt"]], return_tensors="pt")["input_ids"].shape[1]
            ids = full["input_ids"][0].tolist()
            labels.append([IGNORE_INDEX] * prompt_length + ids[prompt_length:])
            for key, value in full.items():
                if key in IMAGE_KEYS:
                    pixels.setdefault(key, []).append(value)
                elif isinstance(value, torch.Tensor) and value.ndim == 2 and value.shape[1] == len(ids):
                    tokens.setdefault(key, []).append(value[0].tolist())
        pads = {"input_ids": self.pad_token_id}
        batch = {key: _pad(values, pads.get(key, 0)) for key, values in tokens.items()}
        batch["labels"] = _pad(labels, IGNORE_INDEX)
        batch.update({key: torch.cat(values) for key, values in pixels.items()})
        return batch


class EpochCallback(TrainerCallback):
    """Tells the collator the epoch at the start of every epoch (its augmentation is seeded by it)."""

    def __init__(self, collator: GSBCollator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.epoch = math.floor((state.epoch or 0.0) + 1e-6)
