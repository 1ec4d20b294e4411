"""Append-only JSONL records: every finished item is on disk at once, so a rerun resumes."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)


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
                    log.warning(f"{path}:{lineno}: skipping a corrupt line (an interrupted write?)")
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


class RunSettingsError(ValueError):
    """A run folder holds files made under other settings than the ones asked for now."""


def fingerprint(value: object) -> str:
    """A short stable hash of bytes or a JSON-able value (prompts, rubrics), for settings too long to store whole."""
    data = value if isinstance(value, bytes) else json.dumps(value, sort_keys=True, default=str).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def bind_run(run_dir: Path, settings: dict, what: str = "run", force: bool = False,
             files: tuple[str, ...] = ()) -> None:
    """Record the settings that determine a run folder's files (`settings.json`); refuse other settings.

    A resumed run reuses the folder's answers and scores, so resuming under another model, seed,
    sampling or judge would mix two experiments; the error names every difference. `force` deletes
    `files` (and the recorded settings) first: the run starts over.
    """
    run_dir = Path(run_dir)
    path = run_dir / "settings.json"
    if force:
        for name in (*files, "settings.json"):
            (run_dir / name).unlink(missing_ok=True)
    settings = json.loads(json.dumps(settings, default=str))
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = {"settings.json": "unreadable"}
        diff = [f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in sorted(set(old) | set(settings))
                if old.get(k) != settings.get(k)]
        if diff:
            raise RunSettingsError(f"{run_dir} holds a {what} made with other settings ({'; '.join(diff)}); "
                                   "pass --force to start over, or choose another output folder")
    write_json(path, settings)
