"""The Hub I/O of smoothed towers and models, implemented above the smoothing core and registered here (dependency
inversion, as a PEFT method fills PEFT's registries): `load_tower` / `save_tower_files` by `models.tower_pretrained`,
`save_with_card` / `push_with_card` by `hub.sharing`. Importing `hf_feature_smoothing` registers all four."""

from collections.abc import Callable


_HUB_IO: dict[str, Callable] = {}


def register_hub_io(**functions: Callable) -> None:
    """Register Hub I/O functions by name (see `_HUB_IO`)."""
    _HUB_IO.update(functions)


def hub_io(name: str) -> Callable:
    """The registered Hub I/O function `name`."""
    if name not in _HUB_IO:
        raise RuntimeError(f"No `{name}` is registered: `import hf_feature_smoothing` (which registers the Hub I/O of "
                           "smoothed towers and models) before loading or saving them.")
    return _HUB_IO[name]


__all__ = ["hub_io", "register_hub_io"]
