"""Turn what users pass as images (processed `pixel_values`, an image processor's outputs, [0, 1] pixel tensors,
`ImageInputs`, PIL images) into one `ImageInputs` per image, refusing tensors whose space is ambiguous or impossible
instead of certifying the wrong input. Shared by certification, attacks and feature centring."""

from collections.abc import Mapping

import torch

from ..smoothing.modeling_smoothed_tower import SmoothedVisionTower
from ..smoothing.towers import ImageInputs
from ..utils.validation import check_images


INPUT_SPACES = ("processed", "pixel")
_PIXEL_TOLERANCE = 1e-3  # [0, 1] pixels may miss the range by float round-off, not more


def _pil_types():
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - PIL ships with transformers' vision extras
        return ()
    return (Image.Image,)


def _range(tensor: torch.Tensor) -> tuple[float, float]:
    return tensor.min().item(), tensor.max().item()


def _in_unit_range(low: float, high: float) -> bool:
    return low >= -_PIXEL_TOLERANCE and high <= 1.0 + _PIXEL_TOLERANCE


def check_processed(tower: SmoothedVisionTower, inputs: ImageInputs, name: str = "pixel_values",
                    hint: str = "Pass [0, 1] images with `input_space='pixel'`, PIL images, or",
                    context: str = "") -> None:
    """Refuse processed pixel values that do not map back to [0, 1] intensities through the tower's normalisation:
    noise of σ there would not be σ in [0, 1] pixel units, the space every radius is stated in."""
    adapter = tower.family
    low, high = _range(adapter.to_image(inputs))
    if not _in_unit_range(low, high):
        raise ValueError(
            f"`{name}`{context} map back to pixel intensities in [{low:.4g}, {high:.4g}] through this model's normalisation "
            f"(mean {adapter.image_mean}, std {adapter.image_std}), outside [0, 1]: they are not this model's "
            f"processed pixel values. {hint} set `image_mean` / `image_std` in the smoothing config to the "
            "processor's."
        )


def _from_tensor(tower: SmoothedVisionTower, images: torch.Tensor, input_space: str | None,
                 image_grid_thw: torch.Tensor | None, name: str) -> ImageInputs:
    adapter = tower.family
    patch_flattened = hasattr(adapter, "_patch")
    if input_space == "pixel" and patch_flattened:
        raise ValueError(f"`input_space='pixel'` needs `(B, 3, H, W)` images, but Qwen-VL towers take "
                         f"patch-flattened `{name}`; pass PIL images or the processor's `pixel_values` with "
                         "`input_space='processed'`.")
    check_images(name, images, 2 if patch_flattened else 4)
    adapter.check_channels(name, images)  # before the range checks: a channel mismatch is not a range error
    if patch_flattened and image_grid_thw is None:
        raise ValueError(f"`image_grid_thw` is required with tensor `{name}` for Qwen-VL towers (the processor "
                         "returns it); or pass PIL images.")
    if input_space == "pixel":
        low, high = _range(images)
        if not _in_unit_range(low, high):
            raise ValueError(f"`{name}` with `input_space='pixel'` must hold [0, 1] intensities, got values in "
                             f"[{low:.4g}, {high:.4g}]; if these are the processor's normalised `pixel_values`, pass "
                             "`input_space='processed'`.")
        like = ImageInputs(images.float())
        return like.with_pixels(adapter.from_image(images.float(), like))
    inputs = ImageInputs(images, image_grid_thw)
    if input_space == "processed":
        check_processed(tower, inputs, name, context=" with `input_space='processed'`")
        return inputs
    low, high = _range(adapter.to_image(inputs))
    maps_to_pixels = _in_unit_range(low, high)
    identity = all(m == 0 for m in adapter.image_mean) and all(s == 1 for s in adapter.image_std)
    if identity and maps_to_pixels:
        return inputs  # the normalisation is the identity: both readings give the same image
    raw_low, raw_high = _range(images)
    if maps_to_pixels and not _in_unit_range(raw_low, raw_high):
        return inputs  # only the processed reading is possible
    raise ValueError(
        f"`{name}` is a tensor with values in [{raw_low:.4g}, {raw_high:.4g}] and `input_space=None`: "
        + ("it could be [0, 1] pixels or processed `pixel_values`" if maps_to_pixels else
           "it cannot be this model's processed `pixel_values` (they map outside [0, 1])")
        + ". Say which with `input_space='pixel'` ([0, 1] intensities) or `input_space='processed'` (the image "
        "processor's output), or pass PIL images."
    )


def tower_device(tower: SmoothedVisionTower) -> torch.device:
    """The device of the tower's weights (CPU for a weightless encoder)."""
    param = next(tower.encoder.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def weights_dtype(tower: SmoothedVisionTower) -> torch.dtype:
    """The dtype of the tower's weights (float32 for a weightless encoder)."""
    param = next(tower.encoder.parameters(), None)
    return param.dtype if param is not None else torch.float32


def pass_dtype(tower: SmoothedVisionTower) -> str:
    """The dtype the tower's passes run in, by name: its autocast dtype, else its weights'."""
    return tower.config.autocast_dtype or str(weights_dtype(tower)).removeprefix("torch.")


def to_image_inputs(
    tower: SmoothedVisionTower,
    images,
    *,
    input_space: str | None = None,
    image_grid_thw: torch.Tensor | None = None,
    image_size: int | None = None,
    name: str = "images",
) -> list[ImageInputs]:
    """
    One `ImageInputs` (processed pixel values, on the tower's device) per image.

    Args:
        tower (`SmoothedVisionTower`): the tower whose processor conventions apply.
        images: a PIL image or a list of them (resized/cropped to `image_size`, default the model's resolution), an
            `ImageInputs` or the image processor's outputs (a `BatchFeature` or mapping with `pixel_values`, and
            `image_grid_thw` for Qwen-VL: processed), or a tensor: `(B, 3, H, W)` images, or Qwen-VL's
            patch-flattened `pixel_values` with `image_grid_thw`.
        input_space (`str`, *optional*): for tensors, `"processed"` (the image processor's normalised output) or
            `"pixel"` ([0, 1] intensities). `None` accepts a tensor only when its values allow one reading;
            otherwise the call fails and asks for this argument.
        name (`str`): the argument name used in error messages.
    """
    device = tower_device(tower)
    return [ImageInputs(i.pixel_values.to(device), None if i.image_grid_thw is None else i.image_grid_thw.to(device))
            for i in _split_inputs(tower, images, input_space, image_grid_thw, image_size, name)]


def _split_inputs(tower, images, input_space, image_grid_thw, image_size, name) -> list[ImageInputs]:
    if input_space not in (None, *INPUT_SPACES):
        raise ValueError(f"`input_space` must be None, 'processed' or 'pixel', got {input_space!r}.")
    pil = _pil_types()
    if pil and isinstance(images, pil):
        images = [images]
    if isinstance(images, Mapping) and "pixel_values" in images:  # processor outputs (a BatchFeature is no dict)
        if image_grid_thw is not None:
            raise ValueError(f"`{name}` carries its own `image_grid_thw` (processor outputs); drop `image_grid_thw`.")
        if not torch.is_tensor(images["pixel_values"]):
            raise TypeError(f"`{name}['pixel_values']` is a {type(images['pixel_values']).__name__}; call the "
                            "processor with `return_tensors='pt'`.")
        images = ImageInputs(images["pixel_values"], images.get("image_grid_thw"))
    if isinstance(images, ImageInputs):
        if input_space == "pixel":
            raise ValueError(f"`{name}` holds processed pixel values (an `ImageInputs` or processor outputs) but "
                             "`input_space='pixel'`; drop `input_space` or pass the [0, 1] tensor itself.")
        return tower.family.split(_from_tensor(tower, images.pixel_values, "processed", images.image_grid_thw,
                                                f"{name}.pixel_values"))
    if isinstance(images, torch.Tensor):
        return tower.family.split(_from_tensor(tower, images, input_space, image_grid_thw, name))
    if isinstance(images, (list, tuple)) and pil and images and all(isinstance(i, pil) for i in images):
        if input_space == "processed":
            raise ValueError(f"`{name}` are PIL images (pixels) but `input_space='processed'`; drop `input_space`.")
        return tower.family.split(tower.family.preprocess(list(images), image_size))
    if isinstance(images, (list, tuple)) and not images:
        raise ValueError(f"`{name}` is empty; pass at least one image.")
    raise TypeError(
        f"`{name}` must be a torch.Tensor (processed `pixel_values` or [0, 1] pixels, see `input_space`), an "
        "`ImageInputs` or the image processor's outputs (with `pixel_values`), a PIL image or a list of PIL images, "
        f"got {type(images).__name__}; convert arrays with `torch.from_numpy` or `PIL.Image.fromarray`."
    )
