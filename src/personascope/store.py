"""Append-only JSONL records: every finished item is on disk at once, so a rerun resumes."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from rich.console import Console

console = Console(stderr=True)


def read_jsonl(path: Path, warn: bool = True) -> Iterator[dict]:
    """Yield the records of a JSONL file; a corrupt line (e.g. a torn last write) is reported and skipped."""
    if not path.exists():
        return
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                if warn:
                    console.print(f"[yellow]{path}:{lineno}: skipping a corrupt line (an interrupted write?)")
                continue
            if isinstance(rec, dict):
                yield rec


class JsonlStore:
    """Records keyed by a tuple of fields; `append` writes and flushes each batch immediately."""

    def __init__(self, path: Path, key_fields: tuple[str, ...]):
        self.path = Path(path)
        self.key_fields = key_fields
        self.records: dict[tuple, dict] = {}
        for rec in read_jsonl(self.path):
            if all(k in rec for k in key_fields):
                self.records[self.key(rec)] = rec
        self._repair_tail()

    def _repair_tail(self) -> None:
        """Make sure the file ends with a newline so the next append starts a fresh line."""
        if self.path.exists() and self.path.stat().st_size:
            with self.path.open("rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")

    def key(self, rec: dict) -> tuple:
        return tuple(rec[k] for k in self.key_fields)

    def __contains__(self, key: tuple) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def get(self, key: tuple) -> dict | None:
        return self.records.get(key)

    def record_for(self, rec: dict) -> dict:
        """The stored record with the key of `rec` (a job that has run); KeyError if there is none."""
        return self.records[self.key(rec)]

    def append(self, recs: Iterable[dict]) -> None:
        recs = list(recs)
        if not recs:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            for rec in recs:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                self.records[self.key(rec)] = rec
            f.flush()
            os.fsync(f.fileno())


def write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str))
    tmp.replace(path)
