"""Exclusive, non-blocking locks on run files and output folders (`filelock`), recording who holds them. A lock
holds on the file, not on the name it is reached by: symlinks and relative paths are resolved, and an existing
file is also locked by its identity (device, inode), so a hard link is the same file too."""

import os
import socket
import sys
import tempfile
import time
from pathlib import Path

from filelock import FileLock, Timeout

from .errors import RunError
from .logging import get_logger


logger = get_logger(__name__)


def lock_path(path: str | os.PathLike, *, hidden: bool = False) -> Path:
    """
    The lock file guarding `path`, the package's one lock-path convention:

    - `<path>.lock` (default): a run file or output folder a user names (`out.jsonl.lock`); [`RunLock`] records its
      holder in it, so it is left visible.
    - `.<name>.lock` beside `path` (`hidden=True`): a folder written atomically or a cache entry
      ([`~utils.atomic.folder_lock`]), hidden like the `.<name>.tmp-*` / `.<name>.old-*` siblings of the swap.
    """
    path = Path(path)
    return path.parent / f".{path.name}.lock" if hidden else Path(f"{path}.lock")


def identity_lock_path(path: str | os.PathLike) -> Path | None:
    """The lock keyed on the identity (device, inode) of the existing file `path`, shared by all its names (hard
    links in other folders included), in `<tempdir>/hf-fs-locks`; `None` when `path` does not exist."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return Path(tempfile.gettempdir()) / "hf-fs-locks" / f"{stat.st_dev}-{stat.st_ino}.lock"


def _holder(file: Path) -> str:
    try:
        return file.read_text(errors="replace").strip() or "unknown"
    except OSError:
        return "unknown"


def _record_holder(file: Path) -> None:
    """Write who holds the lock into its file (only while it is held; readers read it before they try the lock)."""
    with open(file, "w") as f:
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                f"{' '.join(sys.argv)}\n")


class RunLock:
    """
    An exclusive lock on `<real path>.lock` (symlinks and `..` resolved), taken without waiting, and, when the file
    exists, on its identity ([`identity_lock_path`]): a second writer of the same run file, by whatever name,
    fails at once with a [`RunError`] naming the file and the holder (host, pid, start time and command, written
    into the lock file by the holder). The lock is released on exit or when the process dies (kill -9 included:
    `flock`).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.real = Path(os.path.realpath(path))
        self.file = lock_path(self.real)
        self._lock = FileLock(self.file, timeout=0)
        self._identity: FileLock | None = None

    def _refuse(self, file: Path, holder: str) -> RunError:
        same = f" (the same file as {self.real})" if self.real != self.path.absolute() else ""
        return RunError(f"{self.path}{same} is being written by another run (lock {file} is held by: {holder}). "
                        f"Wait for it to finish, stop it, or choose another --output.")

    def acquire(self) -> "RunLock":
        self.file.parent.mkdir(parents=True, exist_ok=True)
        holder = _holder(self.file)
        try:
            self._lock.acquire()
        except Timeout:
            raise self._refuse(self.file, holder) from None
        _record_holder(self.file)
        try:
            self.hold_identity()
        except RunError:
            self.release()
            raise
        return self

    def hold_identity(self) -> None:
        """Also lock the file by its identity, once it exists (call again after creating it); a hard link of a file
        another writer holds raises a [`RunError`]."""
        file = identity_lock_path(self.real)
        if self._identity is not None or file is None:
            return
        lock = FileLock(file, timeout=0)
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        except Timeout:
            raise self._refuse(file, _holder(file)) from None
        except OSError as error:  # a shared temp folder another user owns: the lock on the real path still holds
            logger.debug(f"{self.path}: no lock on the file's identity ({error}); hard links are not guarded.")
            return
        self._identity = lock
        _record_holder(file)

    def is_held(self) -> bool:
        """Whether a live writer holds the lock now (its lock file exists and cannot be taken); takes nothing."""
        if not self.file.exists():
            return False
        try:
            self._lock.acquire()
        except Timeout:
            return True
        except OSError:  # a read-only folder: nobody could write there either
            return False
        self._lock.release()
        return False

    def release(self) -> None:
        if self._identity is not None:
            self._identity.release()
            self._identity = None
        if self._lock.is_locked:
            self._lock.release()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
