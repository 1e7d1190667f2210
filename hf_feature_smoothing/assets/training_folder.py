"""The output folder of a resumable training build (`hf-fs build-llava`, `build-llava-booster`): the settings it was
started with, checked whenever it is continued, and the last checkpoint 🤗 `Trainer` finished writing."""

import json
import re
from pathlib import Path

from ..utils.atomic import write_atomically


SETTINGS_FILE = "recipe.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"  # the last file `Trainer` writes into a checkpoint


def check_settings(output_dir: Path, settings: dict) -> None:
    """Record `settings` in `output_dir/recipe.json`, or refuse to continue a folder trained with other settings
    (checkpoints and stages of two recipes would mix silently), naming each one that differs."""
    stored = output_dir / SETTINGS_FILE
    current = json.loads(json.dumps(settings))
    if not stored.exists():
        write_atomically(stored, json.dumps(current, indent=1))
        return
    previous = json.loads(stored.read_text())
    differing = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
    if differing:
        details = ", ".join(f"{k}: {previous.get(k)!r} → {current.get(k)!r}" for k in differing)
        raise ValueError(f"{output_dir} holds training with other settings ({details}); use another output folder, "
                         "the same settings to continue it, or delete it.")


def last_checkpoint(folder: Path) -> Path | None:
    """The newest `checkpoint-<step>` in `folder` that `Trainer` finished writing (its `trainer_state.json`, written
    last, is there); one cut short by a kill is skipped, so training never restarts from half-saved weights."""
    if not folder.is_dir():
        return None
    done = [(int(m.group(1)), path) for path in folder.iterdir()
            if (m := _CHECKPOINT.match(path.name)) and (path / TRAINER_STATE).is_file()]
    return max(done)[1] if done else None


__all__ = ["SETTINGS_FILE", "check_settings", "last_checkpoint"]
