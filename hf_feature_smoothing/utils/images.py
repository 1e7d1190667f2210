"""The one PIL decoding policy of the package, used by run image sources, booster training data and the tower
families' preprocessing alike:

- high-bit-depth data is scaled to 8 bits (a 16-bit value v becomes round(255 v / 65535)), never clipped; float
  images must hold intensities in [0, 1]; integers of unknown range are refused;
- the EXIF orientation of a decoded file is applied (as `transformers.image_utils.load_image` does);
- the decompression-bomb limit (`max_pixels`) is an error, its warning zone included, and a truncated file is an
  error: both become [`UnreadableImage`] with the reason.
"""

import io
import os
import sys
import warnings
from collections.abc import Callable
from contextlib import contextmanager


#: `max_pixels` value meaning "PIL's own `Image.MAX_IMAGE_PIXELS` at the time of the call"
PIL_LIMIT = "pil"


class UnreadableImage(ValueError):
    """An image file or dataset cell that cannot be turned into an RGB image; the message is the reason."""


@contextmanager
def pixel_limit(max_pixels: int | str | None = PIL_LIMIT):
    """PIL's decompression-bomb limit set to `max_pixels` (None: no limit; [`PIL_LIMIT`]: PIL's current one), its
    warning zone made an error."""
    from PIL import Image

    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = previous if max_pixels == PIL_LIMIT else max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def integer_bits(image) -> int:
    """Bit depth of a single-channel integer image (mode `I;16*` or `I`)."""
    if image.mode.startswith("I;16"):
        return 16
    if image.format == "PNG":  # Pillow < 10.? opens 16-bit PNGs as mode I
        return 16
    tags = getattr(image, "tag_v2", None)
    if tags is not None and tags.get(339, 1) in (1, (1,)):  # TIFF SampleFormat: unsigned integers
        bits = tags.get(258)
        bits = bits[0] if isinstance(bits, tuple) else bits
        if bits in (8, 16, 32):
            return int(bits)
    raise UnreadableImage(f"{image.format or 'unknown'} image of mode {image.mode} (integers of unknown range): "
                          f"convert it to 8- or 16-bit")


def to_rgb(image, *, exif_orientation: bool = True):
    """
    An RGB 8-bit PIL image from any PIL image, scaling high-bit-depth data to the full range (never clipped).

    Args:
        image (`PIL.Image.Image`): the image.
        exif_orientation (`bool`, *optional*, defaults to `True`): apply the EXIF orientation. The towers' own
            preprocessing of a PIL image passes `False`: it sees the pixels the model's processor would see.
    """
    import numpy as np
    from PIL import Image, ImageOps

    if exif_orientation:
        image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I"):
        scale = 255.0 / (2 ** integer_bits(image) - 1)
        values = np.asarray(image, dtype=np.float64)
        if values.min() < 0 or values.max() * scale > 255.0 + 1e-6:
            raise UnreadableImage(f"mode {image.mode} values in [{values.min()}, {values.max()}] exceed the "
                                  f"{integer_bits(image)}-bit range")
        gray = Image.fromarray(np.rint(values * scale).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
            raise UnreadableImage(f"float image (mode F) with values in [{np.nanmin(values)}, {np.nanmax(values)}]"
                                  f", not intensities in [0, 1]: rescale it or save it as 8- or 16-bit")
        return Image.fromarray(np.rint(values * 255).astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def decode(opener: Callable[[], object], max_pixels: int | str | None = PIL_LIMIT):
    """Open (`opener()` gives a path or a binary file), decode the first frame and convert with [`to_rgb`]; the
    file is closed before returning. Any failure becomes [`UnreadableImage`] with the reason."""
    from PIL import Image

    try:
        with pixel_limit(max_pixels), Image.open(opener()) as image:
            image.load()
            return to_rgb(image)
    except UnreadableImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise UnreadableImage(f"DecompressionBombError: {error} (raise --max-image-pixels to allow it)") from None
    except Exception as error:  # noqa: BLE001  (any decoder failure is a property of this file, recorded)
        raise UnreadableImage(f"{type(error).__name__}: {error}") from None


def encoded_image(value) -> Callable[[], object] | None:
    """An opener for [`decode`] if `value` is an encoded image (a `datasets.Image(decode=False)` dict
    `{"bytes": ..., "path": ...}`, raw bytes, or a file path), else `None`."""
    if isinstance(value, dict) and value.get("bytes"):
        return lambda: io.BytesIO(value["bytes"])
    if isinstance(value, dict) and value.get("path"):
        return lambda: value["path"]
    if isinstance(value, (bytes, bytearray)):
        return lambda: io.BytesIO(value)
    if isinstance(value, (str, os.PathLike)):
        return lambda: value
    return None


def load_image(value, column: str = "image", max_pixels: int | str | None = PIL_LIMIT):
    """
    A dataset image value → RGB PIL image, with the package's decoding policy.

    Args:
        value: a PIL image, an encoded image (see [`encoded_image`]), or an HWC array / tensor (uint8, or floats
            in [0, 1]).
        column (`str`, *optional*, defaults to `"image"`): the column `value` comes from (for messages).
        max_pixels (`int`, *optional*): the decompression-bomb limit; `None` disables it; defaults to PIL's.
    """
    from PIL import Image

    if isinstance(value, Image.Image):
        return to_rgb(value)
    opener = encoded_image(value)
    if opener is not None:
        return decode(opener, max_pixels)
    import numpy as np

    torch = sys.modules.get("torch")
    if isinstance(value, np.ndarray) or (torch is not None and isinstance(value, torch.Tensor)):
        array = value if isinstance(value, np.ndarray) else value.numpy()
        if array.dtype != np.uint8:
            if array.min() < 0 or array.max() > 1:
                raise ValueError(f"Float images in column `{column}` must lie in [0, 1], got [{array.min()}, "
                                 f"{array.max()}].")
            array = (array * 255).round().astype(np.uint8)
        return Image.fromarray(array).convert("RGB")
    raise TypeError(f"Column `{column}` holds {type(value).__name__}; expected a PIL image, an HWC uint8 array, a "
                    "path or a `datasets.Image` dict.")


__all__ = ["PIL_LIMIT", "UnreadableImage", "decode", "encoded_image", "load_image", "pixel_limit", "to_rgb"]
