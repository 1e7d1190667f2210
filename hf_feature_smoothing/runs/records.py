"""Run files: strict JSONL whose first line is the run header (command and every parameter that affects rows),
then one row per image. Rows are appended, flushed and fsynced one at a time; whole-file rewrites go through
[`~utils.atomic.write_atomically`], so a kill -9 at any point leaves the previous good state (at worst a torn last
line, dropped on the next open)."""

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..utils.atomic import write_atomically
from ..utils.errors import RunError
from ..utils.logging import get_logger


logger = get_logger(__name__)
FORMAT = "hf-fs-run/1"
STATUSES = ("ok", "skipped")
TIMING_FIELDS = ("elapsed_s",)  # the only row fields that differ between two runs with the same seed


def dumps(obj) -> str:
    """Strict JSON (NaN / inf refused): every line of a run file is readable by any JSON parser."""
    return json.dumps(obj, allow_nan=False, ensure_ascii=False)


def _refuse_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def loads(text: str):
    """Strict JSON: `NaN`, `Infinity` and `-Infinity` are refused."""
    return json.loads(text, parse_constant=_refuse_constant)


def without_timing(row: dict) -> dict:
    """`row` without its timing fields: what two runs with the same parameters and seed agree on exactly."""
    return {k: v for k, v in row.items() if k not in TIMING_FIELDS}


def run_id(command: str, params: dict) -> str:
    """12 hex digits identifying (command, parameters); every row carries it."""
    return hashlib.sha256(dumps({"command": command, "params": params}).encode()).hexdigest()[:12]


def make_header(command: str, params: dict, info: dict | None = None) -> dict:
    """The first line of a run file. `params` are compared on resume; `info` (versions, host, paths) is not."""
    return {"format": FORMAT, "command": command, "run": run_id(command, params), "params": params,
            "info": info or {}}


def describe_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """`name: run has X, this command has Y` for each parameter that differs (missing ones included); within a
    parameter that is a dict on both sides, each entry that differs (`smoothing.feature_center: ...`)."""
    lines = []
    for name in sorted(set(old) | set(new)):
        was, now = old.get(name), new.get(name)
        if isinstance(was, dict) and isinstance(now, dict):
            lines += describe_differences(was, now, f"{prefix}{name}.")
        elif was != now:
            lines.append(f"{prefix}{name}: run has {dumps(was)}, this command has {dumps(now)}")
    return lines


@dataclass
class BadLine:
    number: int
    raw: bytes
    reason: str


@dataclass
class RunContents:
    """What a run file holds: its header, its valid rows in file order, the lines that are not valid rows, and a
    torn last line (no trailing newline: a write cut off by a kill)."""

    path: Path
    header: dict | None = None
    rows: list[dict] = field(default_factory=list)
    bad: list[BadLine] = field(default_factory=list)
    torn: bytes = b""

    @property
    def keys(self) -> set[str]:
        return {row["key"] for row in self.rows}


def _parse_header(raw: bytes) -> tuple[dict | None, str]:
    try:
        header = loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        return None, f"not valid JSON ({error})"
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        return None, f"not an hf-fs run header (expected an object with \"format\": \"{FORMAT}\")"
    for name in ("command", "run", "params"):
        if name not in header:
            return None, f"run header without {name!r}"
    return header, ""


def _check_row(raw: bytes, header: dict, seen: dict[str, int]) -> tuple[dict | None, str]:
    try:
        row = loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "not UTF-8 text (binary data)"
    except ValueError as error:
        return None, f"not valid JSON ({error})"
    if not isinstance(row, dict) or not isinstance(row.get("key"), str):
        return None, "not a row (a JSON object with a string \"key\")"
    if row.get("status") not in STATUSES:
        return None, f"row {row['key']!r} has status {row.get('status')!r}, expected one of {STATUSES}"
    if row.get("run") != header["run"]:
        return None, f"row {row['key']!r} belongs to run {row.get('run')!r}, the header is run {header['run']!r}"
    if row["key"] in seen:
        return None, f"duplicate row for {row['key']!r} (first at line {seen[row['key']]})"
    return row, ""


REWRITE_ADVICE = "Use --overwrite to start a new run there (the file is kept as {path}.bak) or choose another --output."


def read_run(path: str | os.PathLike, advice: str = REWRITE_ADVICE) -> RunContents:
    """Parse a run file without changing it. A missing or empty file gives empty contents (no header); a file whose
    first line is not a run header raises a [`RunError`] ending with `advice` (the caller's fix; `{path}` is
    filled in)."""
    path = Path(path)
    contents = RunContents(path)
    if not path.exists():
        return contents
    lines = path.read_bytes().split(b"\n")
    contents.torn = lines.pop()  # b"" when the file ends with a newline
    if not lines:
        return contents
    header, reason = _parse_header(lines[0])
    if header is None:
        raise RunError(
            f"{path} line 1: {reason}. This is not a run file of this hf-fs version, or its header is damaged, so "
            f"its parameters are unknown. {advice.format(path=path)}"
        )
    contents.header = header
    seen: dict[str, int] = {}
    for number, raw in enumerate(lines[1:], start=2):
        if not raw.strip():
            continue
        row, reason = _check_row(raw, header, seen)
        if row is None:
            contents.bad.append(BadLine(number, raw, reason))
        else:
            seen[row["key"]] = number
            contents.rows.append(row)
    return contents


def corrupt_path(path: str | os.PathLike) -> Path:
    """`<path>.corrupt`: where `--repair` moves the lines of `path` that are not valid rows."""
    return Path(f"{path}.corrupt")


def encode_lines(header: dict, rows: list[dict]) -> bytes:
    return "".join(dumps(obj) + "\n" for obj in [header, *rows]).encode("utf-8")


def load_run(path: str | os.PathLike, *, repair: bool = False) -> RunContents:
    """
    Read a run file for writing: a torn last line is dropped (logged), and lines that are not valid rows raise a
    [`RunError`] naming the file and each line number, unless `repair`, which moves them to `<path>.corrupt`
    (appended, atomically) and keeps every valid row. The caller holds the run's lock.
    """
    contents = read_run(path)
    if contents.bad and not repair:
        shown = "; ".join(f"line {b.number}: {b.reason}" for b in contents.bad[:5])
        more = f" (and {len(contents.bad) - 5} more)" if len(contents.bad) > 5 else ""
        raise RunError(f"{contents.path} has {len(contents.bad)} line(s) that are not valid rows: {shown}{more}. "
                       f"Run again with --repair to move them to {corrupt_path(path)} and continue with the "
                       f"{len(contents.rows)} valid rows.")
    if contents.bad:
        corrupt = corrupt_path(path)
        previous = corrupt.read_bytes() if corrupt.exists() else b""
        write_atomically(corrupt, previous + b"".join(b.raw + b"\n" for b in contents.bad))
        logger.warning(f"{contents.path}: moved {len(contents.bad)} bad line(s) (line "
                       f"{', '.join(str(b.number) for b in contents.bad)}) to {corrupt}; kept {len(contents.rows)} "
                       f"rows.")
    if contents.torn:
        logger.warning(f"{contents.path}: dropped a torn last line ({len(contents.torn)} bytes without a newline, a "
                       f"write cut off by a kill); its image is redone.")
    if contents.header is not None and (contents.bad or contents.torn):
        write_atomically(path, encode_lines(contents.header, contents.rows))
        contents.bad, contents.torn = [], b""
    return contents


class RowWriter:
    """Appends rows to a run file, one fsynced line each (one open file for the whole run)."""

    def __init__(self, path: str | os.PathLike, header: dict):
        self.path, self.header = Path(path), header
        self._file = open(self.path, "ab")

    def append(self, row: dict) -> None:
        if row.get("run") != self.header["run"]:
            raise ValueError(f"row {row.get('key')!r} is for run {row.get('run')!r}, this file is run "
                             f"{self.header['run']!r}.")
        try:
            line = dumps(row)
        except ValueError as error:
            raise RunError(f"row {row.get('key')!r} holds a NaN or inf value ({error}); refusing to write invalid "
                           f"JSON to {self.path}.") from None
        self._file.write((line + "\n").encode("utf-8"))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()
