"""Resumable JSONL results: one row per image, flushed and fsynced as it is written; a row cut off by a kill is
dropped on resume, and rows already written are never redone."""

import json
import os
from pathlib import Path


class JsonlRecords:
    """Append-only JSONL file keyed by `row["key"]`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        if self.path.exists():
            self._recover()

    def _recover(self) -> None:
        text = self.path.read_text()
        lines = text.split("\n")
        complete, tail = lines[:-1], lines[-1]  # a last line without "\n" was cut off mid-write
        for line in complete:
            if line.strip():
                self.rows.append(json.loads(line))
        if tail:
            tmp = self.path.with_suffix(self.path.suffix + ".tmp")
            tmp.write_text("".join(line + "\n" for line in complete if line.strip()))
            os.replace(tmp, self.path)  # atomic: the file is never half-rewritten

    @property
    def done(self) -> set:
        return {row["key"] for row in self.rows}

    def append(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows.append(row)
