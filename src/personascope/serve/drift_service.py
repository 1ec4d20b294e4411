"""The server's drift recording: every chat completion's turn into the database, metrics, alerts, auto-guard.

A conversation is named by the `X-Conversation-Id` header or the body field `conversation_id` (the openai SDK's
`extra_body`); without either, by a hash of its messages up to the first user turn. The turn's index is the
number of assistant messages the request carries. The engine's monitor reads the projections while it generates
(`pre`: the last prompt token; `response`: the mean over the answer's tokens, choice 0), so recording costs no
extra forward. The turn is committed before the response's last byte (the `end` event) is released, so every
acknowledged completion is in the database.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from fastapi import Request

from personascope.monitor import DriftRule, DriftVector

from .drift_store import DriftStore, StoreError, TurnRecord
from .jobs import Job
from .metrics import Metrics
from .protocol import ApiError, ChatRequest, Event, GuardItem, MonitorSpec, text_of

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger(__name__)
HEADER = "x-conversation-id"
FIELD = "conversation_id"
MAX_ID = 128
AUTO_GUARD_MODES = ("cap", "conditional")


def conversation_id(headers: dict[str, str], body: dict) -> str | None:
    """The id a client sent (header first, then body field); None when it sent none."""
    cid = headers.get(HEADER) or body.get(FIELD)
    if cid is None:
        return None
    if not isinstance(cid, str) or not 0 < len(cid) <= MAX_ID:
        raise ApiError(400, f"'{FIELD}' (or the X-Conversation-Id header) must be a string of 1-{MAX_ID} characters",
                       FIELD, "invalid_value")
    return cid


def hashed_id(messages: list) -> str:
    """A stable id from the messages up to and including the first user turn."""
    head = []
    for m in messages:
        head.append([m.get("role"), m.get("content")] if isinstance(m, dict) else m)
        if isinstance(m, dict) and m.get("role") == "user":
            break
    return "h-" + hashlib.sha256(json.dumps(head, sort_keys=True, default=str).encode()).hexdigest()[:24]


class _ObservedQueue(asyncio.Queue):
    """The job's event queue; every event is shown to the recorder as the response handler takes it."""

    def __init__(self, observer: _Turn):
        super().__init__()
        self.observer = observer

    async def get(self) -> Event:
        ev = await super().get()
        await self.observer.see(ev)
        return ev


@dataclass
class _Turn:
    """What one request's choice 0 has shown so far, and where it goes when it ends."""

    service: DriftService
    req: ChatRequest
    cid: str | None
    turn: int
    rid: str
    user_text: str | None
    guard_source: str | None  # "auto" or "request" when a guard acts on this request
    record_names: list[str]
    started: float = field(default_factory=time.monotonic)
    pre: dict[str, float | None] = field(default_factory=dict)
    values: list[dict] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    guarded: int = 0
    finish: str | None = None
    done: bool = False

    async def see(self, ev: Event) -> None:
        if self.done:
            return
        if ev.error is not None:
            self.done = True
            self.service.metrics.requests.labels("error").inc()
            return
        if ev.kind == "prompt":
            self.pre = dict(ev.prompt or {})
        elif ev.kind == "token" and ev.choice == 0:
            self.text.append(ev.text)
            self.guarded += bool(ev.guarded)
            if ev.token is not None and ev.projection is not None:
                self.values.append(ev.projection)
            if ev.finish_reason:
                self.finish = ev.finish_reason
        elif ev.kind == "end":
            self.done = True
            await self.service.finish(self)


class DriftService:
    """Metrics for every request; with a store, the trajectory of each conversation, alerts and the auto-guard."""

    def __init__(self, engine: Engine, store: DriftStore | None = None, vectors: list[DriftVector] | None = None,
                 rule: DriftRule | None = None, auto_guard: str | None = None,
                 guards: dict[str, GuardItem] | None = None, keep_text: bool = True):
        self.engine = engine
        self.store = store
        self.vectors = {dv.name: dv for dv in vectors or []}
        self.rule = rule or DriftRule()
        if auto_guard is not None and auto_guard not in AUTO_GUARD_MODES:
            raise ValueError(f"--auto-guard must be one of {', '.join(AUTO_GUARD_MODES)}, got {auto_guard!r}")
        self.auto_guard = auto_guard
        self.guards = dict(guards or {})
        missing = [n for n in self.vectors if auto_guard and n not in self.guards]
        if missing:
            raise ValueError(f"--auto-guard needs a guard calibration for {', '.join(missing)}: run `personascope "
                             "guard calibrate` on the vector file")
        self.keep_text = keep_text
        self.metrics = Metrics()

    # -- a request
    def _normal(self, name: str, layer: int):
        dv = self.vectors.get(name)
        return dv.normal if dv is not None and dv.layer == layer else None

    async def begin(self, headers: dict[str, str], body: object, req: ChatRequest, rid: str,
                    loop: asyncio.AbstractEventLoop) -> tuple[ChatRequest, Job]:
        """(the request as the client sees it, the engine's job) with the drift monitor and any auto-guard added."""
        body = body if isinstance(body, dict) else {}
        cid = conversation_id(headers, body)
        raw = body.get("messages")
        messages: list = raw if isinstance(raw, list) else []
        recording = self.store is not None and (bool(self.vectors) or (req.monitor is not None and cid is not None))
        if recording and cid is None:
            cid = hashed_id(messages)
        turn = sum(1 for m in messages if isinstance(m, dict) and m.get("role") == "assistant")
        client, engine_req, names = req, req, list[str]()
        guard_source = "request" if req.guard is not None else None
        if recording:
            assert self.store is not None and cid is not None
            engine_req, names = self._monitored(req)
            engaged = await asyncio.to_thread(self.store.guard_of, cid) if self.auto_guard else None
            if engaged is not None and turn > engaged[2] and req.guard is None and engaged[1] in self.guards:
                item = replace(self.guards[engaged[1]], mode=engaged[0])
                client, engine_req, guard_source = replace(req, guard=item), replace(engine_req, guard=item), "auto"
                self.metrics.auto_guard_turns.labels(item.vector, item.mode).inc()
        last_user = next((m.get("content") for m in reversed(messages) if isinstance(m, dict)
                          and m.get("role") == "user"), None)
        user_text = text_of(last_user, "messages") if (recording and self.keep_text and last_user) else None
        job = Job(engine_req, loop)
        job.events = _ObservedQueue(_Turn(self, engine_req, cid if recording else None, turn, rid, user_text,
                                          guard_source, names))
        return client, job

    def _monitored(self, req: ChatRequest) -> tuple[ChatRequest, list[str]]:
        """The request with the drift vectors added to its monitor, and the names to record."""
        mon = req.monitor
        if not self.vectors:  # per-request recording: the client's own monitor
            return req, list(mon.vectors) if mon else []
        names = list(self.vectors)
        if mon is None:
            first = self.vectors[names[0]].layer
            spec = MonitorSpec(names, first, {n: dv.layer for n, dv in self.vectors.items()})
            return replace(req, monitor=spec), names
        extra = [n for n in names if n not in mon.vectors]
        layers = {**mon.layers, **{n: self.vectors[n].layer for n in extra}}
        spec = MonitorSpec([*mon.vectors, *extra], mon.layer, layers)
        return replace(req, monitor=spec), [*dict.fromkeys([*mon.vectors, *names])]

    async def finish(self, t: _Turn) -> None:
        """Metrics for a finished request; with a conversation, its turn written (before the response ends)."""
        m = self.metrics
        elapsed = time.monotonic() - t.started
        m.latency.labels(str(t.req.stream).lower(), str(t.cid is not None).lower()).observe(elapsed)
        m.requests.labels("ok").inc()
        if t.guard_source and t.req.guard is not None and t.guarded:
            m.guarded.labels(t.req.guard.vector, t.guard_source).inc(t.guarded)
        if t.cid is None or self.store is None or t.req.monitor is None:
            return
        mon = t.req.monitor
        layers = {n: mon.layer_of(n) for n in t.record_names}
        pre = {n: t.pre.get(n) for n in layers}
        resp: dict[str, float | None] = {}
        for n in layers:
            vals = [v[n] for v in t.values if v.get(n) is not None]
            resp[n] = math.fsum(vals) / len(vals) if vals else None
        pre_z = {n: (nm.z("pre", pre[n]) if (nm := self._normal(n, la)) else None) for n, la in layers.items()}
        resp_z = {n: (nm.z("response", resp[n]) if (nm := self._normal(n, la)) else None) for n, la in layers.items()}
        guard = f"{t.guard_source}:{t.req.guard.mode}" if t.guard_source and t.req.guard is not None else None
        rec = TurnRecord(t.cid, t.turn, t.rid, self.engine.model_id, len(t.values), layers, pre, pre_z, resp, resp_z,
                         t.user_text, "".join(t.text) if self.keep_text else None, t.finish, guard, t.guarded,
                         elapsed * 1000)
        try:
            alerts = await asyncio.to_thread(self.store.record, rec, self.rule, self.auto_guard)
        except (StoreError, OSError, RuntimeError) as e:
            m.record_errors.inc()
            log.error(f"drift database: turn {t.turn} of {t.cid} not recorded ({type(e).__name__}: {e})")
            return
        except Exception as e:  # a driver's own error class
            m.record_errors.inc()
            log.error(f"drift database: turn {t.turn} of {t.cid} not recorded ({type(e).__name__}: {e})")
            return
        m.records.inc()
        m.observe_turn(pre, pre_z, resp, resp_z)
        for a in alerts:
            m.alerts.labels(a.vector, a.reason).inc()
            log.warning(f"drift alert: conversation {t.cid}, {a.vector} ({a.reason} {a.value:+.2f}) at turn {a.turn}"
                        + (f"; auto-guard {self.auto_guard} from turn {a.turn + 1}" if self.auto_guard else ""))

    # -- routes
    def add_routes(self, app, authorize) -> None:
        """/metrics, /v1/conversations, /v1/conversations/{id} and the conversations page."""
        from importlib import resources

        from fastapi.responses import HTMLResponse, Response

        from .metrics import CONTENT_TYPE

        service = self

        @app.get("/metrics")
        async def metrics(request: Request):
            authorize(request)
            return Response(service.metrics.render(), media_type=CONTENT_TYPE)

        def need_store() -> DriftStore:
            if service.store is None:
                raise ApiError(404, "this server records no conversations: start it with --monitor NAME (and "
                                    "optionally --drift-db)", None, "not_recording")
            return service.store

        @app.get("/v1/conversations")
        async def conversations(request: Request, limit: int = 50):
            authorize(request)
            store = need_store()
            rows = await asyncio.to_thread(store.recent, max(1, min(limit, 500)))
            return {"object": "list", "data": rows, "rule": service.rule.describe(),
                    "auto_guard": service.auto_guard}

        @app.get("/v1/conversations/{cid}")
        async def conversation(cid: str, request: Request):
            authorize(request)
            row = await asyncio.to_thread(need_store().conversation, cid)
            if row is None:
                raise ApiError(404, f"no conversation {cid!r} is recorded", None, "conversation_not_found")
            return row

        @app.get("/conversations", response_class=HTMLResponse)
        async def page():
            return HTMLResponse((resources.files("personascope") / "static" / "conversations.html")
                                .read_text(encoding="utf-8"))
