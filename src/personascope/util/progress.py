"""Progress of long stages without printing: the library reports to a tracker, the caller chooses how it shows.

Library code does `with progress_bar() as bar: task = bar.add_task(...); bar.update(task, advance=n)`. By default
the tracker writes a line to the `personascope` logger at most every 30 s; the CLI installs rich bars with
`set_progress_factory`, a notebook or a service can install its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger("personascope.progress")


class ProgressTracker(Protocol):
    """What a long stage reports: tasks with a total, advanced as work finishes."""

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields: Any) -> Any:
        ...

    def update(self, task_id: Any, *, advance: float | None = None, completed: float | None = None,
               **fields: Any) -> None:
        ...

    def elapsed(self, task_id: Any) -> float:
        ...

    def start(self) -> None:
        ...

    def stop(self) -> None:
        ...

    def __enter__(self) -> ProgressTracker:
        ...

    def __exit__(self, *exc: object) -> None:
        ...


class LogProgress:
    """The default tracker: one `personascope.progress` log line per task at most every `every` seconds and at
    the end."""

    def __init__(self, every: float = 30.0) -> None:
        self.every = every
        self._tasks: dict[int, dict[str, Any]] = {}

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields: Any) -> int:
        now = time.monotonic()
        self._tasks[len(self._tasks)] = {"description": description, "total": total, "completed": completed,
                                         "start": now, "logged": now, "fields": dict(fields)}
        return len(self._tasks) - 1

    def update(self, task_id: int, *, advance: float | None = None, completed: float | None = None,
               **fields: Any) -> None:
        t = self._tasks[task_id]
        if completed is not None:
            t["completed"] = completed
        if advance:
            t["completed"] += advance
        t["fields"].update(fields)
        now = time.monotonic()
        if now - t["logged"] >= self.every:
            t["logged"] = now
            self._log(t)

    def _log(self, t: dict[str, Any]) -> None:
        total = "?" if t["total"] is None else f"{t['total']:.0f}"
        log.info("%s: %.0f/%s %s (%.0f s)", t["description"], t["completed"], total, t["fields"].get("rate", ""),
                 time.monotonic() - t["start"])

    def elapsed(self, task_id: int) -> float:
        return time.monotonic() - self._tasks[task_id]["start"]

    def start(self) -> None:
        pass

    def stop(self) -> None:
        for t in self._tasks.values():
            self._log(t)

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


_factory: Callable[[], ProgressTracker] = LogProgress


def set_progress_factory(factory: Callable[[], ProgressTracker] | None) -> None:
    """Make every later `progress_bar()` call `factory()` (None restores the logging default)."""
    global _factory
    _factory = factory or LogProgress


def progress_bar() -> ProgressTracker:
    """A tracker for one long stage, from the installed factory."""
    return _factory()
