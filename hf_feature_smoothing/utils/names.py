"""Model and booster names as the user gives them: which can only be local paths, and how one reads in shared text."""

import os
from pathlib import Path


def looks_like_path(name: str) -> bool:
    """A name only a local path can be (`./x`, `../x`, `/x`, `~/x`, `C:\\x`, `a/b/c`); `org/name` may be a Hub id."""
    return (name.startswith((".", "~")) or os.path.isabs(name) or "\\" in name or name.count("/") > 1
            or name.endswith("/"))


def shared_name(name: str | None) -> str | None:
    """How a model or booster given as `name` reads in run titles and model cards: a Hub id or built-in alias as
    given, a local folder by its last part (its weights' digest, recorded beside it, identifies it; no machine
    paths in shared text)."""
    if not name or not looks_like_path(name):
        return name
    return Path(name.replace("\\", "/").rstrip("/")).name or name
