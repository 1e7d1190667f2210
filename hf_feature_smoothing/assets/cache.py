"""An on-disk cache of converted assets: each entry is a folder built once, atomically, under a lock."""

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock


def cache_root() -> Path:
    """`$HF_FEATURE_SMOOTHING_CACHE`, else `~/.cache/hf_feature_smoothing`."""
    return Path(os.environ.get("HF_FEATURE_SMOOTHING_CACHE", Path.home() / ".cache" / "hf_feature_smoothing"))


def cached_folder(name: str, build: Callable[[Path], None], marker: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """
    The folder `name` of the cache, built by `build(tmp_folder)` if it is missing. `build` writes into a temporary
    sibling folder that is renamed into place only when complete, under a file lock, so a killed build never leaves
    a half-written entry and two processes never build the same entry at once. `marker` is a file the finished
    folder must contain.
    """
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / name
    if (target / marker).exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{name}.lock")):
        if (target / marker).exists():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
        try:
            build(tmp)
            if not (tmp / marker).exists():
                raise RuntimeError(f"Building the cached asset {name!r} did not write {marker!r}.")
            if target.exists():  # an incomplete entry from an older layout: replace it
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target
