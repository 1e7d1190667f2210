"""Class prototypes for certified cosine-similarity predictors: the few-shot nearest-class-mean classifier
y(x) = argmax_k cos(f(x), t_k) with t_k the normalised mean unit feature of class k's training images."""

import json
import os
from collections.abc import Sequence

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ..smoothing.modeling_smoothed_tower import SmoothedVisionTower
from ..utils.atomic import atomic_path
from .arguments import check_prototypes


PROTOTYPES_KEY = "prototypes"


@torch.inference_mode()
def class_prototypes(tower: SmoothedVisionTower, images: Sequence, labels: Sequence[int], *,
                     num_classes: int | None = None, image_size: int | None = None, batch_size: int = 32,
                     num_samples: int = 0, progress: bool = False) -> torch.Tensor:
    """
    `(K, F)` unit prototypes: for each class the mean of the unit features of its images, normalised. Every class in
    `range(num_classes)` (default `max(labels) + 1`) needs at least one image. Any fixed prototypes give sound
    prediction certificates; smoothed ones (`num_samples` > 0) match what the smoothed predictor sees at the tower's
    σ (noisy features drift towards a common direction as σ grows, away from clean class means).

    Args:
        tower (`SmoothedVisionTower`): the encoder whose (primary) feature the predictor uses.
        images (`Sequence[PIL.Image.Image]`): training images.
        labels (`Sequence[int]`): their class indices.
        image_size (`int`, *optional*): resize/crop size; defaults to the model's resolution.
        num_samples (`int`, *optional*, defaults to 0): 0: the base features f(x) of the clean images (no noise, a
            booster inactive); k > 0: the directions of the smoothed features f̂(x) at the tower's σ, estimated from
            k noisy copies (a booster conditioned on σ; noise from the tower's seed).
    """
    labels = [int(label) for label in labels]
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
        raise ValueError(f"`num_samples` must be an int ≥ 0 (0: clean prototypes), got {num_samples!r}.")
    if len(images) != len(labels) or not labels:
        raise ValueError(f"Need one label per image and at least one image, got {len(images)} images and "
                         f"{len(labels)} labels.")
    num_classes = num_classes or max(labels) + 1
    if min(labels) < 0 or max(labels) >= num_classes:
        raise ValueError(f"`labels` must lie in [0, {num_classes}), got {min(labels)}..{max(labels)}.")
    sums, counts = None, torch.zeros(num_classes)
    for start in tqdm(range(0, len(images), batch_size), desc="prototypes", disable=not progress):
        inputs = tower.family.preprocess(list(images[start : start + batch_size]), image_size)
        device = next(tower.encoder.parameters()).device
        inputs = inputs.with_pixels(inputs.pixel_values.to(device))
        if num_samples:
            unit_sum, _ = tower.monte_carlo(inputs, num_samples)[-1]
            rows_per_image = tower.family.rows_per_image(inputs, unit_sum.shape[0])
            features = torch.stack([nn.functional.normalize(part.flatten(), dim=0)
                                    for part in unit_sum.split(rows_per_image)]).cpu()
        else:
            rows = tower.family.encode(inputs)[-1].float()
            unit, _ = tower._unit_rows(rows[None], inputs)
            features = unit[0].reshape(inputs.num_images, -1).cpu()
        if sums is None:
            sums = torch.zeros(num_classes, features.shape[1])
        index = torch.tensor(labels[start : start + batch_size])
        sums.index_add_(0, index, features)
        counts += torch.bincount(index, minlength=num_classes).float()
    empty = [k for k in range(num_classes) if counts[k] == 0]
    if empty:
        raise ValueError(f"Classes {empty} have no training image; every class needs at least one.")
    return nn.functional.normalize(sums / counts[:, None], dim=1)


def save_prototypes(prototypes: torch.Tensor, path: str | os.PathLike, *, class_names: Sequence[str] | None = None,
                    **metadata) -> None:
    """Write `prototypes` (`(K, F)`) to a safetensors file under the key `prototypes`, with the class names and
    any other string-able `metadata` (model, image size, shots, ...) in the header; atomically."""
    if class_names is not None and len(class_names) != prototypes.shape[0]:
        raise ValueError(f"Got {len(class_names)} class names for {prototypes.shape[0]} prototypes.")
    header = {"class_names": json.dumps(list(class_names) if class_names is not None else None),
              **{k: json.dumps(v) for k, v in metadata.items()}}
    with atomic_path(path) as tmp:
        save_file({PROTOTYPES_KEY: prototypes.contiguous()}, str(tmp), metadata=header)


def load_prototypes(path: str | os.PathLike, name: str | None = None, width: int | None = None) -> torch.Tensor:
    """The `(K, F)` prototypes of a file written by [`save_prototypes`] (any safetensors file with a `prototypes`
    tensor), checked as [`certify_prediction`] checks them (K ≥ 2, finite, no zero row; F = `width` when given).
    Errors name the file (or `name`, e.g. `--prototypes <path>`)."""
    from safetensors.torch import load_file

    name = name or str(path)
    try:
        tensors = load_file(path)
    except Exception as error:  # noqa: BLE001  (safetensors raises its own error types)
        raise ValueError(f"{name}: not a readable safetensors file ({type(error).__name__}: {error}); write it with "
                         f"`hf-fs prototypes` or `save_prototypes`.") from None
    if PROTOTYPES_KEY not in tensors:
        raise ValueError(f"{name}: no `{PROTOTYPES_KEY}` tensor (found {sorted(tensors)}); save the (K, F) class "
                         f"prototypes under that name.")
    prototypes = tensors[PROTOTYPES_KEY]
    check_prototypes(prototypes, name, width)
    return prototypes


def feature_width(tower: SmoothedVisionTower, image_size: int | None = None) -> int:
    """F, the width of the (primary) unit feature of one image that [`certify_prediction`] compares with
    prototypes: one clean pass on a grey image of `image_size` (default: the model's resolution)."""
    from PIL import Image

    size = image_size or tower.family.default_image_size()
    inputs = tower.family.preprocess([Image.new("RGB", (size, size), (128, 128, 128))], image_size)
    device = next(tower.encoder.parameters()).device
    with torch.no_grad():
        return tower.clean_unit_features(inputs.with_pixels(inputs.pixel_values.to(device)))[-1].numel()
