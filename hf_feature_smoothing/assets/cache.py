"""An on-disk cache of converted assets: each entry is a folder built once, atomically, under a lock."""

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from ..utils.atomic import folder_lock, recover, replace_directory, temporary_sibling


def cache_root() -> Path:
    """`$HF_FEATURE_SMOOTHING_CACHE`, else `~/.cache/hf_feature_smoothing`."""
    return Path(os.environ.get("HF_FEATURE_SMOOTHING_CACHE", Path.home() / ".cache" / "hf_feature_smoothing"))


def cached_folder(name: str, build: Callable[[Path], None], marker: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """
    The folder `name` of the cache, built by `build(tmp_folder)` if it is missing. `build` writes into a temporary
    sibling folder that is swapped into place only when complete ([`~utils.atomic.replace_directory`]), under
    [`~utils.atomic.folder_lock`], so a killed build never leaves
    a half-written entry and two processes never build the same entry at once. `marker` is a file the finished
    folder must contain.
    """
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / name
    if (target / marker).exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with folder_lock(target):
        if (target / marker).exists():
            return target
        recover(target)  # deletes the temporary folders of killed builds
        tmp = temporary_sibling(target)
        tmp.mkdir()
        try:
            build(tmp)
            if not (tmp / marker).exists():
                raise RuntimeError(f"Building the cached asset {name!r} did not write {marker!r}.")
            replace_directory(tmp, target)  # an incomplete entry from an older layout is replaced whole
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
