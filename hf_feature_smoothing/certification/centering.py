"""Feature centring: the mean feature μ of a reference set, so that certified cosines are about normalise(f − μ)
rather than the direction every image shares (for DINOv2's CLS feature a uniform grey image already has cosine
≈ 0.56 with a face)."""

import torch
from torch import nn

from ..smoothing.towers import ImageInputs
from .certify import as_smoothed_tower
from .inputs import to_image_inputs, tower_device


@torch.no_grad()
def estimate_feature_mean(
    model_or_tower: nn.Module,
    images,
    *,
    input_space: str | None = None,
    image_grid_thw: torch.Tensor | None = None,
    image_size: int | None = None,
    per_position: bool = False,
    num_samples: int = 0,
    seed: int = 0,
) -> list[float]:
    """
    Mean μ of the primary feature site's raw (un-normalised, uncentred) features over `images`: the value for
    `FeatureSmoothingConfig(feature_center=...)`.

    Use images that are representative of the deployment distribution but are **not** the images you certify (a μ
    fitted on the certified images themselves is still a valid fixed reference for the certificate, since μ is fixed
    before the certification noise is drawn, but it makes the reference levels look better than they are).

    Args:
        model_or_tower (`nn.Module`): a `SmoothedVisionTower`, a smoothed MLLM or a supported stock model.
        images: the reference images (as for `certify`: PIL images, `ImageInputs`, or tensors with `input_space`).
        per_position (`bool`, *optional*, defaults to `False`): `False`: one value per channel, averaged over all
            tokens. `True`: one value per entry of an image's whole feature (tokens × channels, the token positions
            kept apart), for towers whose images all give the same tokens (fixed resolution). Patch tokens share a
            strong positional component across images; removing it per position is what makes the cosines of
            different classes' smoothed features differ (held-out digits, LLaVA's DINOv2 tower + booster at σ = 0.5:
            FS margin certificates at r = 0.1 for 44 % on the projected feature, 31 % on the tower's, instead of
            0–12 % uncentred; `benchmarks/prediction_certificates.py`).
        num_samples (`int`, *optional*, defaults to 0): 0 averages clean passes; k > 0 averages k noisy copies per
            image at the tower's σ (booster conditioned on σ), the centre of the features the smoothed tower sees.
        seed (`int`, *optional*, defaults to 0): seed of those copies' noise (a function of seed and image only).
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
        raise ValueError(f"`num_samples` must be an int ≥ 0 (0: clean passes), got {num_samples!r}.")
    tower = as_smoothed_tower(model_or_tower)
    inputs_list = to_image_inputs(tower, images, input_space=input_space, image_grid_thw=image_grid_thw,
                                  image_size=image_size)
    channels = tower.feature_channels(inputs_list[0])
    total, count = None, 0
    with tower._compute_context(tower_device(tower)):
        for batch in _batches(tower, inputs_list, num_samples, seed):
            features = tower.family.encode(batch)[-1].double()
            if per_position:
                if features.shape[0] != batch.num_images:  # e.g. Qwen-VL: one row per token, images of any size
                    raise ValueError(f"`per_position=True` needs a tower that gives one feature row per image of a "
                                     f"fixed token count; {type(tower.family).__name__} gives one per token. Use "
                                     f"`per_position=False` (one value per channel).")
            else:
                features = features.reshape(-1, channels)
            if total is not None and features.shape[1] != total.numel():
                raise ValueError(f"`per_position=True`: images give features of {total.numel()} and "
                                 f"{features.shape[1]} values; use images of one resolution (`image_size`) or "
                                 f"`per_position=False`.")
            total = features.sum(0) if total is None else total + features.sum(0)
            count += features.shape[0]
    return (total / count).tolist()


def _batches(tower, inputs_list: list[ImageInputs], num_samples: int, seed: int):
    """Tower inputs: clean images batched by layout (`num_samples` 0), else `num_samples` seeded noisy copies of one
    image at a time, at most `chunk_size` per call."""
    chunk = tower.config.chunk_size
    if not num_samples:
        for start in range(0, len(inputs_list), chunk):
            yield from _same_layout_batches(inputs_list[start : start + chunk])
        return
    for inputs in inputs_list:
        (source,) = tower.noise_streams(inputs, seed, "feature-center")
        for start in range(0, num_samples, chunk):
            copies = min(chunk, num_samples - start)
            yield tower.add_noise(inputs, copies, source=source, start=start)


def _same_layout_batches(inputs_list: list[ImageInputs]) -> list[ImageInputs]:
    """Concatenate images whose pixel layouts match into one tower input each."""
    groups: dict[tuple, list[ImageInputs]] = {}
    for inputs in inputs_list:
        groups.setdefault(tuple(inputs.pixel_values.shape[1:]), []).append(inputs)
    return [ImageInputs(torch.cat([i.pixel_values for i in group]),
                        None if group[0].image_grid_thw is None else torch.cat([i.image_grid_thw for i in group]))
            for group in groups.values()]
