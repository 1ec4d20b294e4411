"""Append-only JSONL records: every finished item is on disk at once, so a rerun resumes."""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class JsonLine:
    """One non-blank line of a JSONL file: its 1-based number, its text and value, or why it cannot be read."""

    line: int
    text: str | None = None  # the decoded line without its line end (None when it is not UTF-8 or too long)
    value: Any = None
    error: str | None = None


def iter_json_lines(path: str | Path, max_bytes: int | None = None) -> Iterator[JsonLine]:
    """Every non-blank line of a JSONL file, parsed: the one reader of every JSONL input and record file.

    Lines end at \\n only (U+2028, U+0085 and a lone \\r are text inside a line, as JSON allows), a UTF-8 BOM
    before the first line is ignored, and a line that is not UTF-8, too long, not JSON or nested too deeply
    comes out with its `error` instead of stopping the reader. Non-finite numbers (NaN, Infinity) read as None.
    """
    with Path(path).open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            if max_bytes is not None and len(raw) > max_bytes:
                yield JsonLine(lineno, error=f"the row is {len(raw)} bytes; the limit is {max_bytes}")
                continue
            try:
                text = raw.decode("utf-8").removesuffix("\n").removesuffix("\r")
            except UnicodeDecodeError as e:
                yield JsonLine(lineno, error=f"not UTF-8 ({e.reason} at byte {e.start})")
                continue
            if not text.strip():
                continue
            try:
                value = json.loads(text, parse_constant=lambda _: None)
            except json.JSONDecodeError as e:
                yield JsonLine(lineno, text, error=f"bad JSON: {e.msg} at column {e.colno}")
                continue
            except RecursionError:
                yield JsonLine(lineno, text, error="JSON nested too deeply")
                continue
            yield JsonLine(lineno, text, value)


def read_jsonl(path: Path, warn: bool = True) -> Iterator[dict]:
    """Yield the records of a JSONL file; a corrupt line (e.g. a torn last write) is reported and skipped."""
    if not Path(path).exists():
        return
    for rec in iter_json_lines(path):
        if rec.error is not None:
            if warn:
                log.warning(f"{path}:{rec.line}: skipping a corrupt line ({rec.error}; an interrupted write?)")
            continue
        if isinstance(rec.value, dict):
            yield rec.value


def finite(value: Any) -> Any:
    """`value` with every non-finite float (NaN, ±inf) replaced by None, in nested dicts and lists too."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def dump_json(value: Any, **kw: Any) -> str:
    """JSON text of `value` in which a non-finite number is null (never the bare NaN that is not JSON)."""
    try:
        return json.dumps(value, allow_nan=False, **kw)
    except ValueError:
        return json.dumps(finite(value), allow_nan=False, **kw)


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
        """Drop a torn last line (a write cut short, even inside a UTF-8 character) so the next append starts a
        fresh line; every complete line is kept."""
        if not self.path.exists() or not self.path.stat().st_size:
            return
        with self.path.open("rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":
                return
            size = f.seek(0, os.SEEK_END)
            start = max(0, size - (1 << 20))
            while True:  # find the last newline, reading back a block at a time
                f.seek(start)
                cut = f.read(size - start).rfind(b"\n")
                if cut >= 0 or start == 0:
                    break
                start = max(0, start - (1 << 20))
            keep = start + cut + 1 if cut >= 0 else 0
            f.seek(keep)
            try:  # a whole record that only lacks its newline is kept
                whole = isinstance(json.loads(f.read().decode("utf-8")), dict)
            except (UnicodeDecodeError, ValueError, RecursionError):
                whole = False
            if whole:
                f.write(b"\n")
                return
            log.warning(f"{self.path}: dropping a torn last line ({size - keep} bytes; an interrupted write)")
            f.truncate(keep)

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
                rec = finite(rec)
                f.write(dump_json(rec, ensure_ascii=False) + "\n")
                self.records[self.key(rec)] = rec
            f.flush()
            os.fsync(f.fileno())


def write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(dump_json(data, indent=2, ensure_ascii=False, default=str))
    tmp.replace(path)


class RunSettingsError(ValueError):
    """A run folder holds files made under other settings than the ones asked for now."""


def fingerprint(value: object) -> str:
    """A short stable hash of bytes or a JSON-able value (prompts, rubrics), for settings too long to store whole."""
    data = value if isinstance(value, bytes) else json.dumps(value, sort_keys=True, default=str).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def refuse_escaping_links(run_dir: Path) -> None:
    """Raise RunSettingsError when an entry of `run_dir` is a symbolic link to somewhere outside it (a run writes
    only inside its folder)."""
    root = Path(run_dir).resolve()
    if not Path(run_dir).is_dir():
        return
    for entry in Path(run_dir).iterdir():
        if entry.is_symlink():
            target = entry.resolve()
            if target != root and root not in target.parents:
                raise RunSettingsError(f"{entry} is a symbolic link to {target}, outside the run folder; a run "
                                       "writes only inside its folder: remove the link")


def bind_run(run_dir: Path, settings: dict, what: str = "run", force: bool = False,
             files: tuple[str, ...] = ()) -> None:
    """Record the settings that determine a run folder's files (`settings.json`); refuse other settings.

    A resumed run reuses the folder's answers and scores, so resuming under another model, seed,
    sampling or judge would mix two experiments; the error names every difference. `force` deletes
    `files` (and the recorded settings) first: the run starts over.
    """
    run_dir = Path(run_dir)
    path = run_dir / "settings.json"
    refuse_escaping_links(run_dir)
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
