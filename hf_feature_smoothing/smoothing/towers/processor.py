"""The checkpoint's own image processor: its normalisation statistics and the pixel grid it produces.

Noise and certificates live in [0, 1] pixel space *after* the processor's resize / crop, so both the statistics
(`image_mean` / `image_std`) and the geometry (resize, crop; Qwen-VL: the `smart_resize` grid) are read from the
checkpoint: `processor_config.json` (transformers ≥ 5 nests them under `"image_processor"`) or
`preprocessor_config.json` (older checkpoints, top level)."""

import json
import os
from collections.abc import Sequence
from typing import NamedTuple

import torch

from ...utils.images import to_rgb
from ...utils.logging import get_logger
from ..configuration_feature_smoothing import IMAGE_PROCESSOR_KEYS


logger = get_logger(__name__)

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
HUB_KWARGS = ("revision", "subfolder", "cache_dir", "token", "local_files_only", "force_download", "proxies")


def _image_processor_dict(data: dict, filename: str) -> dict | None:
    if filename == "processor_config.json":
        data = data.get("image_processor")
    return data if isinstance(data, dict) and ("image_mean" in data or "size" in data) else None


def _geometry(processor: dict) -> dict:
    """The resize / crop settings of an image processor's dict (`do_pad` only when it pads: absent means no pad)."""
    return {k: processor[k] for k in IMAGE_PROCESSOR_KEYS if k in processor and (k != "do_pad" or processor[k])}


def optional_file(path, filename: str, **hub_kwargs) -> str | None:
    """The local path of `filename` in the folder or Hub repo `path` (read from the cache, downloaded when allowed),
    or None when it has no such file or it cannot be reached."""
    from transformers.utils import cached_file

    try:
        return cached_file(str(path), filename, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False, **hub_kwargs)
    except OSError:
        return None


def read_processor_settings(path: str | os.PathLike, **hub_kwargs) -> dict:
    """
    `image_mean`, `image_std` and the resize / crop settings (`image_processor`) of the checkpoint at `path` (folder
    or Hub repo id), from `processor_config.json` (checked first: what transformers 5 writes) or
    `preprocessor_config.json`. Returns `{}` when neither has them; `"source"` names the file used.

    Args:
        path (`str` or `os.PathLike`): folder or Hub repo id.
        hub_kwargs: `revision`, `subfolder`, `cache_dir`, `token`, `local_files_only`, ... as for `from_pretrained`.
    """
    hub = {k: v for k, v in hub_kwargs.items() if k in HUB_KWARGS and v is not None}
    for filename in PROCESSOR_FILES:
        file = optional_file(path, filename, **hub)
        if file is None:
            continue
        with open(file) as f:
            processor = _image_processor_dict(json.load(f), filename)
        if processor is None:
            continue
        settings = {k: processor[k] for k in ("image_mean", "image_std") if k in processor}
        geometry = _geometry(processor)
        if geometry:
            settings["image_processor"] = geometry
        settings["source"] = os.path.join(str(path), hub.get("subfolder") or "", filename)
        return settings
    return {}


class PixelStats(NamedTuple):
    """A processor's normalisation statistics, the pixel space noise is drawn in: `(image_mean, image_std)`."""

    mean: Sequence[float]
    std: Sequence[float]


def processor_stats(processor) -> dict:
    """`image_mean` / `image_std` of a processor or image processor object (those it has)."""
    image_processor = getattr(processor, "image_processor", processor)
    return {k: [float(v) for v in getattr(image_processor, k)] for k in ("image_mean", "image_std")
            if getattr(image_processor, k, None) is not None}


def processor_settings(processor) -> dict:
    """`image_mean`, `image_std` and the resize / crop settings (`image_processor`) of a processor or image processor
    object: what [`read_processor_settings`] reads from the files it saves."""
    settings = processor_stats(processor)
    image_processor = getattr(processor, "image_processor", processor)
    if callable(getattr(image_processor, "to_json_string", None)):
        geometry = _geometry(json.loads(image_processor.to_json_string()))
        if geometry:
            settings["image_processor"] = geometry
    return settings


def resolve_pixel_stats(family: str, image_mean=None, image_std=None, *, processor=None, settings: dict | None = None,
                        path: str | os.PathLike | None = None, default: tuple | None = None, once: bool = False,
                        **hub_kwargs) -> PixelStats:
    """
    The normalisation statistics (`image_mean`, `image_std`) smoothing uses for a `family` tower: the package's one
    resolution path. Each of the two is taken from the first source that has it:

    1. `image_mean` / `image_std` as given (the smoothing config);
    2. `processor`, a processor or image processor object;
    3. the checkpoint's processor files: `settings` as returned by [`read_processor_settings`], else read from
       `path` (a folder or Hub repo id, with `hub_kwargs`); logged at INFO;
    4. the family default (`default`, else the registered [`TowerFamily.family_default_stats`]), with a warning
       naming `path` (`once`: at most once per message).
    """
    from . import TOWER_FAMILIES

    found = {"image_mean": image_mean, "image_std": image_std}

    def take(values: dict) -> bool:
        taken = {k: values[k] for k in found if found[k] is None and values.get(k) is not None}
        found.update(taken)
        return bool(taken)

    if processor is not None:
        take(processor_stats(processor))
    if any(v is None for v in found.values()) and (settings is not None or path):
        files = settings if settings is not None else read_processor_settings(path, **hub_kwargs)
        if take(files):
            logger.info(f"Smoothing `{path}` with the processor statistics of {files['source']}: "
                        f"image_mean={found['image_mean']}, image_std={found['image_std']}.")
    if any(v is None for v in found.values()):
        default = dict(zip(found, default or TOWER_FAMILIES[family].family_default_stats(family)))
        found = {k: v if v is not None else list(default[k]) for k, v in found.items()}
        where = (f"`{path}` has no `image_mean` / `image_std` in processor_config.json or preprocessor_config.json"
                 if path else "No `image_mean` / `image_std` in the smoothing config, a processor or a checkpoint")
        (logger.warning_once if once else logger.warning)(
            f"{where}: smoothing with the `{family}` family default mean={found['image_mean']}, "
            f"std={found['image_std']}. If the model's processor normalises differently, the noise is not in [0, 1] "
            "pixel space: load with `from_pretrained` (it reads processor_config.json / preprocessor_config.json) "
            "or pass them: `smoothing={'image_mean': [...], 'image_std': [...]}`."
        )
    return PixelStats(found["image_mean"], found["image_std"])


def _size_dict(size, square: bool) -> dict:
    if isinstance(size, (int, float)):
        return {"height": int(size), "width": int(size)} if square else {"shortest_edge": int(size)}
    return dict(size)


def processor_pixels(image, geometry: dict, image_mean: Sequence[float] | None = None) -> torch.Tensor:
    """A PIL image → `(3, H, W)` float tensor in [0, 1] on the grid the processor described by `geometry` produces
    (with `do_pad`: padded to a centred square in the colour of `image_mean`, as LLaVA's processor does; then resize
    and centre crop), computed with transformers' own PIL backend so it matches the processor exactly."""
    from PIL import Image
    from transformers.image_processing_backends import PilBackend

    image = to_rgb(image, exif_orientation=False)
    if geometry.get("do_pad") and image.width != image.height:
        side = max(image.width, image.height)
        colour = tuple(int(m * 255) for m in image_mean) if image_mean else (0, 0, 0)
        square = Image.new("RGB", (side, side), colour)
        square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        image = square

    crop = geometry.get("do_center_crop", "crop_size" in geometry)
    size = _size_dict(geometry.get("size", 224), square=not crop)
    kwargs = dict(do_resize=geometry.get("do_resize", True), size=size, resample=geometry.get("resample", 3),
                  do_center_crop=bool(crop), do_rescale=True, rescale_factor=1 / 255, do_normalize=False,
                  do_convert_rgb=True, default_to_square=False)
    if crop:
        kwargs["crop_size"] = _size_dict(geometry.get("crop_size", size), square=True)
    return PilBackend(**kwargs)(image, return_tensors="pt")["pixel_values"][0].float()


def qwen_pixels(image, geometry: dict, patch: int, merge: int) -> torch.Tensor:
    """A PIL image → `(3, H, W)` in [0, 1] at the Qwen-VL processor's `smart_resize` grid (H, W multiples of the
    model's patch × merge size, H·W within the processor's min/max pixels)."""
    from transformers.image_processing_backends import PilBackend
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    size = geometry.get("size") or {}
    min_pixels = geometry.get("min_pixels") or size.get("shortest_edge") or 56 * 56
    max_pixels = geometry.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280
    height, width = smart_resize(image.height, image.width, factor=patch * merge, min_pixels=min_pixels,
                                 max_pixels=max_pixels)
    backend = PilBackend(do_resize=True, size={"height": height, "width": width}, resample=geometry.get("resample", 3),
                         do_center_crop=False, do_rescale=True, rescale_factor=1 / 255, do_normalize=False,
                         do_convert_rgb=True)
    return backend(to_rgb(image, exif_orientation=False), return_tensors="pt")["pixel_values"][0].float()
