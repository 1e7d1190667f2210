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
) -> list[float]:
    """
    Per-channel mean μ of the primary feature site's raw (un-normalised, uncentred) features over the clean
    `images` and all their tokens: the value for `FeatureSmoothingConfig(feature_center=...)`.

    Use images that are representative of the deployment distribution but are **not** the images you certify (a μ
    fitted on the certified images themselves is still a valid fixed reference for the certificate, since μ is fixed
    before the certification noise is drawn, but it makes the reference levels look better than they are).

    Args:
        model_or_tower (`nn.Module`): a `SmoothedVisionTower`, a smoothed MLLM or a supported stock model.
        images: the reference images (as for `certify`: PIL images, `ImageInputs`, or tensors with `input_space`).
    """
    tower = as_smoothed_tower(model_or_tower)
    inputs_list = to_image_inputs(tower, images, input_space=input_space, image_grid_thw=image_grid_thw,
                                  image_size=image_size)
    channels = tower.feature_channels(inputs_list[0])
    total = torch.zeros(channels, dtype=torch.float64, device=tower_device(tower))
    rows = 0
    chunk = tower.config.chunk_size
    with tower._compute_context(total.device):
        for start in range(0, len(inputs_list), chunk):
            for batch in _same_layout_batches(inputs_list[start : start + chunk]):
                features = tower.family.encode(batch)[-1].double().reshape(-1, channels)
                total += features.sum(0)
                rows += features.shape[0]
    return (total / rows).tolist()


def _same_layout_batches(inputs_list: list[ImageInputs]) -> list[ImageInputs]:
    """Concatenate images whose pixel layouts match into one tower input each."""
    groups: dict[tuple, list[ImageInputs]] = {}
    for inputs in inputs_list:
        groups.setdefault(tuple(inputs.pixel_values.shape[1:]), []).append(inputs)
    return [ImageInputs(torch.cat([i.pixel_values for i in group]),
                        None if group[0].image_grid_thw is None else torch.cat([i.image_grid_thw for i in group]))
            for group in groups.values()]
