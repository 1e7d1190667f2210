"""Atomic checkpoint folders: a save is written into a temporary sibling folder and swapped in whole, so a crash
(kill -9 included) at any point leaves either the previous checkpoint or the new one, never a mix.

The swap is one `renameat2(RENAME_EXCHANGE)` on Linux (the folder is never missing); elsewhere, or on file systems
without it, two renames: old → `.<name>.old-*`, new → `<name>`. A save interrupted between those two renames is
rolled back (the old folder is renamed back) by [`recover`], which every save and every load of this package runs
first; orphaned temporary folders are deleted there too."""

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


TMP_TAG, OLD_TAG = ".tmp-", ".old-"
# files a save owns: when the new save does not write them they are stale (e.g. shards of a bigger earlier save) and
# are not carried over; anything else already in the folder (tokenizer, processor, user files) is kept
OWNED_PREFIXES = ("model.safetensors", "model-", "pytorch_model", "adapter_model", "adapter_config.json",
                  "config.json", "generation_config.json", "README.md", "feature_smoothing.json")


def _siblings(target: Path, tag: str) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}{tag}*"))


def lock_path(target: str | os.PathLike) -> Path:
    target = Path(target)
    return target.parent / f".{target.name}.lock"


def recover(target: str | os.PathLike) -> None:
    """Finish the crash recovery of `target`: if a two-rename swap was interrupted (the folder is missing but its
    renamed-away copy exists), put the previous checkpoint back; delete orphaned temporary folders."""
    target = Path(target)
    olds = _siblings(target, OLD_TAG)
    if not target.exists() and olds:
        os.rename(olds[-1], target)
        olds = olds[:-1]
    for path in olds + _siblings(target, TMP_TAG):
        shutil.rmtree(path, ignore_errors=True)


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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root))


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


def _swap_in(new: Path, target: Path) -> None:
    if not target.exists():
        os.rename(new, target)
    elif not _exchange(new, target):
        old = target.parent / f".{target.name}{OLD_TAG}{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
        os.rename(new, target)
        shutil.rmtree(old)
        return
    _fsync(target.parent)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """
    Yield an empty temporary folder beside `target`; when the block ends without error, its content replaces
    `target` atomically (files of the previous folder that the save does not own are carried over). On error
    `target` is left as it was. Concurrent saves to one target are serialised by a file lock.
    """
    target = Path(target).absolute()
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"`save_directory`={str(target)!r} is a file; pass a folder.")
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_path(target))):
        recover(target)
        tmp = target.parent / f".{target.name}{TMP_TAG}{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
            if target.exists():
                _carry_over(target, tmp)
            _sync_tree(tmp)
            _swap_in(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # after an exchange it holds the previous checkpoint


def recover_if_local(path: str | os.PathLike) -> None:
    """Before loading a local folder: if a save was killed between the two renames of the fallback swap (the folder
    is missing, its previous copy renamed away), put the previous checkpoint back. Hub repo ids are left alone."""
    target = Path(path).absolute()
    if target.exists() or not target.parent.is_dir() or not _siblings(target, OLD_TAG):
        return
    with FileLock(str(lock_path(target))):
        recover(target)


__all__ = ["atomic_directory", "recover", "recover_if_local"]
