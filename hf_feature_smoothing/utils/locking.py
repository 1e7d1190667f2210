"""Exclusive, non-blocking locks on run files and output folders (`filelock`), recording who holds them."""

import os
import socket
import sys
import time
from pathlib import Path

from filelock import FileLock, Timeout

from .errors import RunError


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


class RunLock:
    """
    An exclusive lock on `<path>.lock`, taken without waiting: a second writer of the same run file fails at once
    with a [`RunError`] naming the file and the holder (host, pid, start time and command, written into the lock
    file by the holder). The lock is released on exit or when the process dies (kill -9 included: `flock`).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.file = lock_path(path)
        self._lock = FileLock(self.file, timeout=0)

    def acquire(self) -> "RunLock":
        self.file.parent.mkdir(parents=True, exist_ok=True)
        try:
            holder = self.file.read_text(errors="replace").strip() or "unknown"
        except OSError:
            holder = "unknown"
        try:
            self._lock.acquire()
        except Timeout:
            raise RunError(
                f"{self.path} is being written by another run (lock {self.file} is held by: {holder}). Wait for it "
                f"to finish, stop it, or choose another --output."
            ) from None
        # the holder is recorded only while the lock is held; readers read it before they try the lock
        with open(self.file, "w") as f:
            f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                    f"{' '.join(sys.argv)}\n")
        return self

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
