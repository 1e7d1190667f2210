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


def _private_lock_folder() -> Path:
    """`<tempdir>/hf-fs-locks-<uid>`, created 0700 and checked to be this user's own real folder (nobody else can
    plant a symlink there); raises `OSError` otherwise."""
    folder = Path(tempfile.gettempdir()) / f"hf-fs-locks-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    folder.mkdir(mode=0o700, exist_ok=True)
    stat = os.lstat(folder)
    if not os.path.isdir(folder) or os.path.islink(folder) or (hasattr(os, "getuid") and stat.st_uid != os.getuid()):
        raise OSError(f"{folder} is not a folder of this user's own")
    return folder


def identity_lock_path(path: str | os.PathLike) -> Path | None:
    """The lock keyed on the identity (device, inode) of the existing file `path`, shared by all its names (hard
    links in other folders included), in this user's `<tempdir>/hf-fs-locks-<uid>`; `None` when `path` does not
    exist. Raises `OSError` when that folder cannot be made private."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return _private_lock_folder() / f"{stat.st_dev}-{stat.st_ino}.lock"


def _holder(file: Path) -> str:
    try:
        return file.read_text(errors="replace").strip() or "unknown"
    except OSError:
        return "unknown"


def _record_holder(file: Path) -> None:
    """Write who holds the lock into its file (only while it is held; readers read it before they try the lock)."""
    descriptor = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(descriptor, "w") as f:
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
        self._identity_file: Path | None = None

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
        """Also lock the file by its identity once it exists, and again whenever it changed (an atomic rewrite gives
        the file a new inode: call this after creating or rewriting it); a hard link of a file another writer holds
        raises a [`RunError`]."""
        try:
            file = identity_lock_path(self.real)
        except OSError as error:  # no private lock folder: the lock on the real path still holds
            logger.warning(f"{self.path}: no lock on the file's identity ({error}); hard links to it are not guarded.")
            return
        if file is None or file == self._identity_file:
            return
        lock = FileLock(file, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise self._refuse(file, _holder(file)) from None
        if self._identity is not None:
            self._identity.release()
        self._identity, self._identity_file = lock, file
        _record_holder(file)

    def is_held(self) -> bool:
        """Whether a live writer holds the lock now: by the real path or by the file's identity. Probing takes a
        free lock for an instant and releases it (filelock offers no other test), so a writer starting at that very
        instant may be refused once and should simply retry."""
        try:
            identity = identity_lock_path(self.real)
        except OSError:
            identity = None
        for file, lock in ((self.file, self._lock), (identity, FileLock(identity, timeout=0) if identity else None)):
            if file is None or not file.exists():
                continue
            try:
                lock.acquire()
            except Timeout:
                return True
            except OSError:  # a read-only folder: nobody could write there either
                continue
            lock.release()
        return False

    def release(self) -> None:
        if self._identity is not None:
            self._identity.release()
            self._identity, self._identity_file = None, None
        if self._lock.is_locked:
            self._lock.release()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
