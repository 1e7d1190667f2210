"""Atomic files and folders: the one way this package replaces something on disk, so a crash (kill -9 included) at
any point leaves the previous version or the new one, never a mix.

- A file ([`atomic_path`], [`write_atomically`]) is written to a temporary sibling `.<name>.tmp-<hex>`, fsynced,
  renamed over the target with `os.replace`, and the folder is fsynced.
- A folder ([`atomic_directory`], [`replace_directory`]) is written into a temporary sibling folder and swapped in
  whole: one `renameat2(RENAME_EXCHANGE)` on Linux (the folder is never missing); elsewhere, or on file systems
  without it, two renames: old → `.<name>.old-<hex>`, new → `<name>`. A swap interrupted between those two renames
  is rolled back (the old folder is renamed back) by [`recover`], which every save and every load of this package
  runs first; orphaned temporary folders are deleted there too.
- Concurrent writers of one folder are serialised by [`folder_lock`], the lock file `.<name>.lock` beside it (see
  [`~utils.locking.lock_path`], the one lock-path convention).
"""

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock

from .locking import lock_path


TMP_TAG, OLD_TAG = ".tmp-", ".old-"
# files a save owns: when the new save does not write them they are stale (e.g. shards of a bigger earlier save) and
# are not carried over; anything else already in the folder (tokenizer, processor, user files) is kept
OWNED_PREFIXES = ("model.safetensors", "model-", "pytorch_model", "adapter_model", "adapter_config.json",
                  "config.json", "generation_config.json", "README.md", "feature_smoothing.json", "booster")


def fsync_path(path: str | os.PathLike) -> None:
    """Flush the file or folder `path` to disk. A folder that cannot be opened for it (Windows) is skipped."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if os.path.isdir(path):
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not os.path.isdir(path):
            raise
    finally:
        os.close(fd)


def _sync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(root)


def temporary_sibling(target: str | os.PathLike) -> Path:
    """A fresh hidden name beside `target`, `.<name>.tmp-<hex>`: where its next version is written."""
    target = Path(target)
    return target.parent / f".{target.name}{TMP_TAG}{uuid.uuid4().hex[:8]}"


def _siblings(target: Path, tag: str) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}{tag}*"))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """
    Yield a temporary path beside `path` to write the new file to (by any writer: `save_file`, `savefig`, ...);
    when the block ends without error it is fsynced and renamed over `path`, and the folder is fsynced. On error
    `path` is left as it was and the temporary file is deleted. A symlink is written through (it stays a link).
    """
    path = Path(os.path.realpath(path))
    tmp = temporary_sibling(path)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomically(path: str | os.PathLike, data: bytes | str, encoding: str = "utf-8") -> Path:
    """Replace the file `path` by `data` (bytes, or text written with `encoding`): readers see the old or the new
    file, never part of one. Returns `path`."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode(encoding) if isinstance(data, str) else data)
    return path


def folder_lock(target: str | os.PathLike) -> FileLock:
    """The blocking lock that serialises writers of the folder `target` (`.<name>.lock` beside it)."""
    return FileLock(str(lock_path(target, hidden=True)))


def recover(target: str | os.PathLike) -> None:
    """Finish the crash recovery of `target`: if a two-rename swap was interrupted (the folder is missing but its
    renamed-away copy exists), put the previous version back; delete orphaned temporary folders."""
    target = Path(target)
    olds = _siblings(target, OLD_TAG)
    if not target.exists() and olds:
        os.rename(olds[-1], target)
        olds = olds[:-1]
    for path in olds + _siblings(target, TMP_TAG):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _libc():
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name, use_errno=True) if name else None


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths `a` and `b` in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`); False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    libc = _libc()
    if libc is None or not hasattr(libc, "renameat2"):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _swap_in(new: Path, target: Path) -> None:
    if not target.exists():
        os.rename(new, target)
    elif not _exchange(new, target):
        old = target.parent / f".{target.name}{OLD_TAG}{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
        os.rename(new, target)
        shutil.rmtree(old)
        return
    fsync_path(target.parent)


def replace_directory(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """
    Make the complete folder `new` (a [`temporary_sibling`] of `target`) the folder `target`, atomically: its files
    are fsynced, then it is swapped in. After an exchange `new` holds the previous folder; the caller deletes it.
    The caller holds [`folder_lock`]`(target)`.
    """
    new, target = Path(new), Path(target)
    _sync_tree(new)
    _swap_in(new, target)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry_over(old: Path, new: Path) -> None:
    """Keep what the previous folder had beside the checkpoint (processor, tokenizer, ...), unless the new save
    wrote it or owns it."""
    for entry in old.iterdir():
        if (new / entry.name).exists() or entry.name.startswith(OWNED_PREFIXES):
            continue
        if entry.is_dir():
            shutil.copytree(entry, new / entry.name, copy_function=_link_or_copy, symlinks=True)
        else:
            _link_or_copy(str(entry), str(new / entry.name))


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """
    Yield an empty temporary folder beside `target`; when the block ends without error, its content replaces
    `target` atomically (files of the previous folder that the save does not own are carried over). On error
    `target` is left as it was. Concurrent saves to one target are serialised by [`folder_lock`]. A symlinked
    `target` is saved through (the link stays a link, and every name of the folder takes the same lock).
    """
    target = Path(os.path.realpath(target))
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"`save_directory`={str(target)!r} is a file; pass a folder.")
    target.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(target):
        recover(target)
        tmp = temporary_sibling(target)
        tmp.mkdir()
        try:
            yield tmp
            if target.exists():
                _carry_over(target, tmp)
            replace_directory(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # after an exchange it holds the previous checkpoint


def recover_if_local(path: str | os.PathLike) -> None:
    """Before loading a local folder: if a save was killed between the two renames of the fallback swap (the folder
    is missing, its previous copy renamed away), put the previous checkpoint back. Hub repo ids are left alone."""
    target = Path(path).absolute()
    if target.exists() or not target.parent.is_dir() or not _siblings(target, OLD_TAG):
        return
    with folder_lock(target):
        recover(target)


__all__ = ["OWNED_PREFIXES", "atomic_directory", "atomic_path", "folder_lock", "fsync_path", "recover",
           "recover_if_local", "replace_directory", "temporary_sibling", "write_atomically"]
