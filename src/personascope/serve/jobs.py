"""Requests and rows inside the serving engine: a Job is one HTTP request (its events go to the server's
asyncio loop), a Row one sequence of a batch (one choice of a request) with its text, stops and finish reason."""

from __future__ import annotations

import asyncio
import secrets
from typing import TYPE_CHECKING, Protocol

import torch

from .protocol import ApiError, ChatRequest, Event

if TYPE_CHECKING:
    from personascope.model import ModelAdapter


class Engine(Protocol):
    """What a row needs of the serving engine (`engine.Engine`): the model, detokenising and the stop ids."""

    adapter: ModelAdapter
    eos_ids: set[int]

    def decode(self, ids: list[int]) -> str:
        ...


class Job:
    """One HTTP request in the engine: events go to an asyncio queue on the server's loop (or, without a loop,
    straight into the queue, e.g. in tests)."""

    def __init__(self, request: ChatRequest, loop: asyncio.AbstractEventLoop | None = None):
        self.request = request
        self.loop = loop
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = False
        self.finished_rows = 0

    def fail(self, error: ApiError) -> None:
        """End this request with an error (once); its other rows stop at the next step."""
        if not self.cancelled:
            self.emit(Event("error", error=error))
        self.cancelled = True

    def emit(self, event: Event) -> None:
        if self.loop is None:
            self.events.put_nowait(event)
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is gone (server shutting down)
            self.cancelled = True


class Row:
    """One sequence of a batch (one choice of one request): text, stop strings, finish reason."""

    def __init__(self, engine: Engine, job: Job, choice: int):
        self.engine, self.job, self.choice = engine, job, choice
        req = job.request
        seed = req.seed + choice if req.seed is not None else secrets.randbits(62)
        self.generator = torch.Generator(device=engine.adapter.device).manual_seed(seed % (2**63))
        self.ids: list[int] = []
        self.text = ""  # decoded answer so far (complete characters only, until the row finishes)
        self._offsets = (0, 0)  # incremental detokenisation: (context start, end of decoded ids)
        self.emitted = 0
        self.finished = False
        self.reason: str | None = None
        self._pending: tuple[str, dict | None, str | None, bool | None] | None = None
        self.guard_touched = 0
        self._maxstop = max((len(s) for s in req.stop), default=0)

    def _detokenize(self, force: bool = False) -> None:
        """Extend `text` with the new tokens, decoded with a little context; wait out split UTF-8 characters."""
        start, read = self._offsets
        before = self.engine.decode(self.ids[start:read])
        after = self.engine.decode(self.ids[start:])
        if len(after) > len(before) and (force or not after.endswith("\ufffd")):
            self.text += after[len(before):]
            self._offsets = (read, len(self.ids))

    def accept(self, tid: int, entry: dict | None, guarded: bool | None = None) -> None:
        """Take one sampled token (`guarded`: chosen under the guard); work out its text and whether the row is done."""
        req = self.job.request
        eos = tid in self.engine.eos_ids
        if not eos:
            self.ids.append(tid)
        count = len(self.ids) + (1 if eos else 0)
        self._detokenize(force=eos or count >= req.max_tokens)
        text = self.text
        end = len(text)
        if req.stop:
            hits = [i for i in (text.find(s, max(0, self.emitted - self._maxstop)) for s in req.stop) if i >= 0]
            if hits:
                end, self.finished, self.reason = min(hits), True, "stop"
        if not self.finished:
            if eos:
                self.finished, self.reason = True, "stop"
            elif count >= req.max_tokens:
                self.finished, self.reason = True, "length"
            else:
                end = self._safe_end(text)
        delta = text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        # the monitor's token text is the piece of content this token released, so pieces join to the content
        self._pending = (delta, entry, delta if not eos or delta else None, guarded)
        self.guard_touched += bool(guarded)

    def _safe_end(self, text: str) -> int:
        """How much text can be released: hold back a tail that may start a stop string."""
        end = len(text)
        for k in range(min(self._maxstop - 1, end - self.emitted), 0, -1):
            if any(s.startswith(text[end - k :]) for s in self.job.request.stop):
                return end - k
        return end

    def flush(self, projection: dict[str, float | None] | None) -> None:
        """Send this step's event (after the forward that saw the token, so its projection is known)."""
        if self._pending is None or self.job.cancelled:
            return
        delta, entry, token, guarded = self._pending
        self._pending = None
        self.job.emit(Event("token", self.choice, delta, entry, token, projection if token is not None else None,
                            self.reason if self.finished else None, guarded=guarded))
        if self.finished:
            self.job.finished_rows += 1
            if self.job.finished_rows == self.job.request.n:
                self.job.emit(Event("end"))

