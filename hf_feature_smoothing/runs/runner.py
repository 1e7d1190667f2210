"""A resumable, locked run writing one row per image into `output` (directly, or through per-rank shards merged at
the end when several processes share the work)."""

import os
from collections.abc import Callable
from pathlib import Path

from ..utils.atomic import fsync_path, write_atomically
from ..utils.errors import RunError
from ..utils.locking import RunLock, lock_path
from ..utils.logging import get_logger
from .records import (
    STATUSES,
    RowWriter,
    RunContents,
    describe_differences,
    dumps,
    encode_lines,
    load_run,
    loads,
    make_header,
    read_run,
    without_timing,
)
from .sharding import Shard, existing_shards, shard_path


logger = get_logger(__name__)


def _merge(parts: list[RunContents]) -> list[dict]:
    """Rows of `parts` (output first, then shards), one per key, in source order (stable on `index`)."""
    rows: dict[str, dict] = {}
    for part in parts:
        for row in part.rows:
            kept = rows.setdefault(row["key"], row)
            if kept is not row and without_timing(kept) != without_timing(row):
                logger.warning(f"{part.path}: row {row['key']!r} differs from the one already merged; keeping the "
                               f"first.")
    return sorted(rows.values(), key=lambda row: row.get("index", 0))


class Run:
    """
    The rows of one run in `output` (a `.jsonl` file whose first line holds the command and its parameters).

    Protocol (every process calls the same methods in the same order):

    1. `lock()`: rank 0 takes `<output>.lock` without waiting; a second writer fails at once, on every rank.
    2. `open(params, info)`: rank 0 merges shards left by a stopped run, reads the output (a torn last line is
       dropped; other bad lines raise unless `repair`) and compares its parameters with `params`: a difference
       raises, naming each parameter and both values, unless `overwrite` (the old file, and shards of a stopped
       run, are kept with a `.bak` suffix).
       Parameters given as `None` in `params` and listed in `resolve` take the run's value (a resumed run keeps its
       seed) or, for a new run, `resolve[name]()`. Then every rank reads the done keys; with several processes each
       rank writes its own locked shard `<stem>.rank{r}-of-{w}.jsonl`.
    3. `append(row)` for each new row; `finish()` waits for every rank and rank 0 merges the shards into the output
       in source order; `close()` releases the locks (also on errors).

    Args:
        output (`str` or `os.PathLike`):
            The run file (`.jsonl`).
        command (`str`):
            What writes the rows (`"certify"`, `"attack"`); a file of another command is never continued.
        shard ([`Shard`], *optional*, defaults to a single process):
            This process's rank and the number of processes ([`Shard.from_accelerate`]).
        overwrite (`bool`, *optional*, defaults to `False`):
            Start a new run even if `output` holds one (kept as `<output>.bak`).
        repair (`bool`, *optional*, defaults to `False`):
            Move lines that are not valid rows to `<output>.corrupt` instead of refusing to continue.
    """

    def __init__(self, output: str | os.PathLike, command: str, shard: Shard | None = None, *,
                 overwrite: bool = False, repair: bool = False):
        self.output = Path(os.path.realpath(output)) if os.path.islink(output) else Path(output)  # rows go to the file
        self.command = command
        self.shard = shard or Shard()
        self.overwrite, self.repair = overwrite, repair
        self.header: dict | None = None
        self.done: set[str] = set()
        self._locks: list[RunLock] = []
        self._writer: RowWriter | None = None
        self._path: Path | None = None

    def _rewrite(self, data: bytes) -> None:
        """Replace the output atomically; its new inode is locked again (a hard link made later is guarded too)."""
        write_atomically(self.output, data)
        for lock in self._locks:
            if lock.real == Path(os.path.realpath(self.output)):
                lock.hold_identity()

    # ----- 1. lock ------------------------------------------------------------------------------------------------
    def _on_main(self, work: Callable[[], object]):
        """Run `work` on rank 0 and hand its result (or its error) to every rank."""
        result, error = None, None
        if self.shard.is_main:
            try:
                result = work()
            except RunError as e:
                error = str(e)
        result, error = self.shard.broadcast((result, error))
        if error is not None:
            raise RunError(error)
        return result

    def lock(self) -> "Run":
        def take():
            self.output.parent.mkdir(parents=True, exist_ok=True)
            self._locks.append(RunLock(self.output).acquire())

        self._on_main(take)
        return self

    # ----- 2. open ------------------------------------------------------------------------------------------------
    def _merge_leftovers(self) -> RunContents:
        main = load_run(self.output, repair=self.repair)
        shards = existing_shards(self.output)
        if not shards:
            return main
        locks = []
        try:
            for path in shards:
                try:
                    locks.append(RunLock(path).acquire())
                except RunError as error:
                    raise RunError(f"A process of an earlier run still writes the shard {path}: {error}") from None
            parts = [main]
            for path in shards:
                part = load_run(path, repair=self.repair)
                header = main.header or part.header
                if part.header is not None and (header["run"], header["params"]) != (part.header["run"],
                                                                          part.header["params"]):
                    raise RunError(
                        f"The shard {path} belongs to another run than {self.output}: "
                        f"{'; '.join(describe_differences(header['params'], part.header['params']))}. Move it away.")
                main.header = header
                parts.append(part)
            rows = _merge(parts)
            if main.header is not None:
                self._rewrite(encode_lines(main.header, rows))
            for path in shards:
                path.unlink()
        finally:
            for lock in locks:
                lock.release()
                lock.file.unlink(missing_ok=True)
        logger.info(f"{self.output}: merged {len(shards)} shard(s) of a stopped run ({len(rows)} rows now).")
        return read_run(self.output)

    def _set_aside(self) -> None:
        """`--overwrite`: keep the output (whatever it holds) and shards of a stopped run with a `.bak` suffix
        (`.bak.1`, `.bak.2`, ... when earlier backups exist: none is ever replaced)."""
        for path in [self.output, *existing_shards(self.output)]:
            if path.exists():
                backup, number = Path(f"{path}.bak"), 0
                while backup.exists():
                    number += 1
                    backup = Path(f"{path}.bak.{number}")
                os.rename(path, backup)
                fsync_path(backup.parent)
                logger.warning(f"--overwrite: {path} is kept as {backup}; starting a new run.")

    def _prepare(self, params: dict, info: dict, resolve: dict[str, Callable[[], object]],
                 newer_params: tuple[str, ...] = (), check_resumed: Callable[[dict], None] | None = None) -> None:
        if self.overwrite:
            self._set_aside()
        main = self._merge_leftovers()
        if main.header is not None and main.header["command"] != self.command:
            raise RunError(f"{self.output} holds a `{main.header['command']}` run, not `{self.command}`: choose "
                           f"another --output, or --overwrite (the old file is kept as {self.output}.bak, or the next free .bak.N).")
        if main.header is not None and check_resumed is not None:
            check_resumed(main.header)
        old = main.header["params"] if main.header is not None else {}
        for name, draw in resolve.items():
            if params.get(name) is None:
                params[name] = old[name] if name in old else draw()
        params = loads(dumps(params))  # compare as JSON (tuples are lists, ...)
        if main.header is not None:
            unrecorded = [name for name in newer_params if name in params and name not in old]
            differences = describe_differences(old, {k: v for k, v in params.items() if k not in unrecorded})
            if unrecorded and not differences:
                logger.warning(f"{self.output} was made before run headers recorded {', '.join(unrecorded)}: it is "
                               f"continued as it is, but its rows cannot be checked against this command's "
                               f"{'; '.join(f'{k} {dumps(params[k])}' for k in unrecorded)}. Use --overwrite to "
                               f"start a run that records them (the old file is kept as {self.output}.bak, or the next free .bak.N).")
            if differences:
                raise RunError(
                    f"{self.output} holds a run with other parameters, so its rows cannot be continued by this "
                    f"command: {'; '.join(differences)}. Use the run's parameters to resume it, --overwrite to start "
                    f"a new run in this file (the old one is kept as {self.output}.bak, or the next free .bak.N), or another --output.")
            self._record_expected(main, info)
            return
        self._rewrite(encode_lines(make_header(self.command, params, info), []))

    def _record_expected(self, main: RunContents, info: dict) -> None:
        """A resumed run's header gets this command's `expected_rows` (the source may have grown or shrunk): the
        report's rows done / expected then describe the run as it is now continued."""
        expected = info.get("expected_rows")
        if expected is None or main.header.get("info", {}).get("expected_rows") == expected:
            return
        main.header["info"] = {**main.header.get("info", {}), "expected_rows": expected}
        self._rewrite(encode_lines(main.header, main.rows))

    def open(self, params: dict, info: dict | None = None,
             resolve: dict[str, Callable[[], object]] | None = None,
             newer_params: tuple[str, ...] = (), check_resumed: Callable[[dict], None] | None = None) -> "Run":
        """Check or create the run header, then get ready to append. Returns `self`; `self.params` holds the run's
        parameters (resolved ones included) on every rank. `newer_params`: parameters that headers written before
        they were recorded lack; such a run is continued with its header as it is, and a warning names them.
        `check_resumed(header)`: called with the header of a run about to be continued; it raises (`RunError`) when
        the rows cannot be continued for a reason the parameters alone do not show."""
        self._on_main(lambda: self._prepare(dict(params), info or {}, resolve or {}, tuple(newer_params),
                                            check_resumed))
        for lock in self._locks:  # a repair may have rewritten the file (a new inode)
            lock.hold_identity()
        contents = read_run(self.output)
        self.header = contents.header
        self.done = contents.keys
        if self.shard.world == 1:
            self._path = self.output
        else:
            self._path = shard_path(self.output, self.shard.rank, self.shard.world)
            shard_lock = RunLock(self._path).acquire()
            self._locks.append(shard_lock)
            shard_header = {**self.header, "shard": [self.shard.rank, self.shard.world]}
            write_atomically(self._path, encode_lines(shard_header, []))
            shard_lock.hold_identity()
        self._writer = RowWriter(self._path, self.header)
        logger.info(f"{self.output}: run {self.header['run']}, {len(self.done)} rows already done"
                    + (f" (rank {self.shard.rank} of {self.shard.world} writes {self._path})"
                       if self.shard.world > 1 else ""))
        return self

    @property
    def params(self) -> dict:
        return self.header["params"]

    # ----- 3. rows, finish, close ---------------------------------------------------------------------------------
    def append(self, row: dict) -> None:
        """Write one row (it gets the run id); its key is then done. A row without a `status` of `STATUSES` would
        not be read back (the file would look damaged), so it is refused here."""
        if not isinstance(row.get("key"), str) or row.get("status") not in STATUSES:
            raise ValueError(f"a run row needs a string `key` and a `status` in {STATUSES}; got key "
                             f"{row.get('key')!r}, status {row.get('status')!r}.")
        row = {**row, "run": self.header["run"]}
        self._writer.append(row)
        self.done.add(row["key"])

    def finish(self) -> list[dict] | None:
        """Wait for every rank; rank 0 merges the shards into the output. Returns the output's rows on rank 0,
        `None` elsewhere."""
        self._writer.close()
        self._writer = None
        self.shard.barrier()
        if not self.shard.is_main:
            return None
        if self.shard.world > 1:
            parts = [load_run(self.output, repair=self.repair)] + [
                load_run(shard_path(self.output, r, self.shard.world), repair=self.repair)
                for r in range(self.shard.world)]
            rows = _merge(parts)
            self._rewrite(encode_lines(self.header, rows))
            for r in range(self.shard.world):
                path = shard_path(self.output, r, self.shard.world)
                path.unlink(missing_ok=True)
                lock_path(path).unlink(missing_ok=True)
            logger.info(f"{self.output}: merged {self.shard.world} shards, {len(rows)} rows.")
        return read_run(self.output).rows

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for lock in reversed(self._locks):
            lock.release()
        self._locks.clear()

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
