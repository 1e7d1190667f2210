"""What a tower family's inputs are: `ImageInputs` (one tower call's processed pixels), the processor statistics the
families default to, and the PIL resize / crop the families share (the one decoder is `utils.images`)."""

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from ...utils.images import to_rgb


OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)


@dataclass
class ImageInputs:
    """Processed image inputs of one tower call: `pixel_values` as the processor returns them (normalised) and,
    for patch-flattened towers (Qwen-VL), `image_grid_thw` with one `(t, h, w)` row per image."""

    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor | None = None

    @property
    def num_images(self) -> int:
        return len(self.image_grid_thw) if self.image_grid_thw is not None else self.pixel_values.shape[0]

    def with_pixels(self, pixel_values: torch.Tensor) -> "ImageInputs":
        return replace(self, pixel_values=pixel_values)

    @staticmethod
    def concat(parts: Sequence["ImageInputs"]) -> "ImageInputs":
        """The images of `parts`, in order, as the inputs of one call."""
        grids = [part.image_grid_thw for part in parts]
        return ImageInputs(torch.cat([part.pixel_values for part in parts]),
                           None if grids[0] is None else torch.cat(grids))

    def model_kwargs(self) -> dict:
        """The model's image arguments: `pixel_values`, and `image_grid_thw` for patch-flattened (Qwen-VL) inputs."""
        if self.image_grid_thw is None:
            return {"pixel_values": self.pixel_values}
        return {"pixel_values": self.pixel_values, "image_grid_thw": self.image_grid_thw}


def center_crop(image, height: int, width: int):
    """Resize (bicubic) so the image covers `height × width`, then centre-crop; returns an RGB PIL image."""
    from PIL import Image

    image = to_rgb(image, exif_orientation=False)
    scale = max(height / image.height, width / image.width)
    resized = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                           Image.Resampling.BICUBIC)
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))


def pil_to_tensor(image) -> torch.Tensor:
    """RGB PIL image → `(3, H, W)` float tensor in [0, 1]."""
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(image.height, image.width, 3).permute(2, 0, 1).float() / 255.0


__all__ = ["IMAGENET_DEFAULT_MEAN", "IMAGENET_DEFAULT_STD", "IMAGENET_STANDARD_MEAN", "IMAGENET_STANDARD_STD",
           "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "ImageInputs", "center_crop", "pil_to_tensor"]
