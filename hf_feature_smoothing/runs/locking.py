"""The run-file locks live in `utils.locking` (below the runs, so training recipes can take them); re-exported
here."""

from ..utils.locking import RunLock, lock_path


__all__ = ["RunLock", "lock_path"]
