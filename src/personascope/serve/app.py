"""The FastAPI app of `personascope serve`: OpenAI-style responses (whole or SSE), auth, limits, dashboard."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import socket
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING

from fastapi import Request

from .engine import Engine, Job, finite
from .lifecycle import Drain
from .protocol import LOOPBACK_HOSTS, ChatRequest, ServeConfig
from .wire import ApiError, decode_body, json_depth

log = logging.getLogger(__name__)
__all__ = ["BrowserGuard", "complete", "create_app", "host_name", "json_depth", "run_server", "stream"]

if TYPE_CHECKING:
    from .drift_service import DriftService

# ---------------------------------------------------------------- responses


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _monitor_head(engine: Engine, req: ChatRequest, prompt: dict[str, float | None] | None) -> dict | None:
    if req.monitor is None:
        return None
    layer = req.monitor.layer
    scale = {n: {"baseline": engine.baselines[n][layer],
                 "norm": finite(engine.vectors[n].vector(layer).norm())} for n in req.monitor.vectors}
    return {"layer": layer, "vectors": req.monitor.vectors, "prompt": prompt, "scale": scale}


def _steering_echo(req: ChatRequest) -> list[dict] | None:
    if not req.steering:
        return None
    return [{"vector": s.vector, "layer": s.layer, "coef": s.coef, "positions": s.positions} for s in req.steering]


@dataclass
class _Choice:
    """What one choice of a non-streaming completion has collected so far."""

    text: list[str] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    proj: list[dict[str, float | None]] = field(default_factory=list)
    fired: list[bool] = field(default_factory=list)
    finish: str | None = None


async def complete(engine: Engine, req: ChatRequest, job: Job, rid: str) -> dict:
    """Collect a whole (non-streaming) completion."""
    choices = [_Choice() for _ in range(req.n)]
    prompt, prompt_tokens, completion_tokens = None, 0, 0
    while True:
        ev = await job.events.get()
        if ev.error is not None:  # kind "error"
            raise ev.error
        if ev.kind == "end":
            break
        if ev.kind == "prompt":
            prompt, prompt_tokens = ev.prompt, ev.prompt_tokens
            continue
        ch = choices[ev.choice]
        completion_tokens += 1
        ch.text.append(ev.text)
        if ev.logprob is not None:
            ch.logprobs.append(ev.logprob)
        if req.guard is not None:
            ch.fired.append(bool(ev.guarded))
        if ev.token is not None and req.monitor:
            ch.tokens.append(ev.token)
            ch.proj.append(ev.projection or {})
        if ev.finish_reason:
            ch.finish = ev.finish_reason
    out_choices = []
    for c, ch in enumerate(choices):
        item: dict = {"index": c, "message": {"role": "assistant", "content": "".join(ch.text)},
                      "finish_reason": ch.finish or "stop",
                      "logprobs": {"content": ch.logprobs, "refusal": None} if req.logprobs else None}
        if req.monitor:
            item["monitor"] = {"tokens": ch.tokens,
                               "projections": {n: [p[n] for p in ch.proj] for n in req.monitor.vectors}}
        if req.guard is not None:
            item["guard"] = {"touched": sum(ch.fired), "fired": ch.fired}
        out_choices.append(item)
    resp = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": engine.model_id,
            "choices": out_choices, "usage": _usage(prompt_tokens, completion_tokens)}
    if req.monitor:
        resp["monitor"] = _monitor_head(engine, req, prompt)
    if req.steering:
        resp["steering"] = _steering_echo(req)
    if req.guard is not None:
        resp["guard"] = {**req.guard.echo(), "touched": sum(sum(ch.fired) for ch in choices)}
    return resp


async def cancel_on_disconnect(request: Request, job: Job, every: float = 0.1) -> None:
    """End a non-streaming job when its client goes away, so an abandoned request stops generating."""
    while not job.cancelled:
        if await request.is_disconnected():
            job.fail(ApiError(499, "the client closed the connection", None, "client_closed"))
            return
        await asyncio.sleep(every)


def host_name(header: str) -> str:
    """The host part of a Host header ('[::1]:8000' -> '::1', 'localhost:80' -> 'localhost')."""
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class BrowserGuard:
    """ASGI middleware refusing what any web page could send: a non-JSON POST (which skips the CORS
    preflight) and, on a keyless loopback server, a non-loopback Host header (DNS rebinding)."""

    def __init__(self, app, config: ServeConfig):
        self.app, self.config = app, config

    def refusal(self, method: str, headers: dict[str, str]) -> ApiError | None:
        host = headers.get("host", "")
        if self.config.guard_host and host_name(host.lower()) not in LOOPBACK_HOSTS:
            return ApiError(403, f"Host {host!r} is not a loopback name: a keyless server on loopback answers only "
                            "requests addressed to 127.0.0.1, localhost or [::1]", None, "forbidden_host")
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if method == "POST" and ctype != "application/json":
            return ApiError(415, f"POST bodies must be sent as 'Content-Type: application/json', got {ctype!r}", None,
                            "unsupported_media_type")
        return None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            from fastapi.responses import JSONResponse

            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            err = self.refusal(scope["method"], headers)
            if err is not None:
                await JSONResponse(err.body(), status_code=err.status)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


async def stream(engine: Engine, req: ChatRequest, job: Job, rid: str):
    """Yield SSE lines: a role chunk per choice, one chunk per token step, usage if asked, then [DONE] (after an
    error event too)."""
    created = int(time.time())
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": engine.model_id}
    completion_tokens, prompt_tokens = 0, 0
    touched = [0] * req.n
    try:
        while True:
            ev = await job.events.get()
            if ev.error is not None:  # kind "error": an error event, then the end of the stream
                yield _sse(ev.error.body())
                yield _sse("[DONE]")
                return
            if ev.kind == "end":
                break
            if ev.kind == "prompt":
                prompt_tokens = ev.prompt_tokens
                for c in range(req.n):
                    chunk = {**base, "choices": [{"index": c, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}]}
                    if c == 0 and req.monitor:
                        chunk["monitor"] = _monitor_head(engine, req, ev.prompt)
                    if c == 0 and req.steering:
                        chunk["steering"] = _steering_echo(req)
                    if c == 0 and req.guard is not None:
                        chunk["guard"] = req.guard.echo()
                    yield _sse(chunk)
                continue
            completion_tokens += 1
            choice: dict = {"index": ev.choice, "delta": {"content": ev.text} if ev.text else {},
                            "logprobs": {"content": [ev.logprob], "refusal": None} if ev.logprob else None,
                            "finish_reason": ev.finish_reason}
            if req.monitor and ev.token is not None and ev.projection is not None:
                choice["monitor"] = {"tokens": [ev.token],
                                     "projections": {n: [ev.projection[n]] for n in req.monitor.vectors}}
            if req.guard is not None:
                touched[ev.choice] += bool(ev.guarded)
                choice["guard"] = {"fired": [bool(ev.guarded)]}
                if ev.finish_reason:
                    choice["guard"]["touched"] = touched[ev.choice]
            yield _sse({**base, "choices": [choice]})
        if req.include_usage:
            yield _sse({**base, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
        yield _sse("[DONE]")
    finally:
        job.cancelled = True  # a client that went away stops its rows at the next step


# ---------------------------------------------------------------- the app


def _dashboard_html() -> str:
    return (resources.files("personascope") / "static" / "dashboard.html").read_text(encoding="utf-8")


def create_app(engine: Engine, drift: DriftService | None = None):
    """The FastAPI app around an engine (the engine's worker starts and stops with the app); `app.state.drain`
    ends open requests in the protocol's shape at shutdown (see `run_server`); `drift` adds /metrics,
    conversation recording and /v1/conversations (serve/drift_service.py)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect

    cfg = engine.config
    drain = Drain(cfg.drain_timeout_s)

    @asynccontextmanager
    async def lifespan(app):
        drain.loop = asyncio.get_running_loop()
        engine.start()
        yield
        drain.end_open()
        engine.stop()
        if drift is not None and drift.store is not None:
            drift.store.close()

    app = FastAPI(title="personascope", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.drain = drain

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    app.add_middleware(BrowserGuard, config=cfg)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        return JSONResponse(ApiError(exc.status_code, str(exc.detail), None, None).body(),
                            status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        return JSONResponse(ApiError(400, str(exc.errors()[:1]), None, None).body(), status_code=400)

    @app.exception_handler(Exception)
    async def server_error(request, exc: Exception):
        log.error("internal error", exc_info=exc)
        return JSONResponse(ApiError(500, f"internal error: {type(exc).__name__}", None, None, "server_error")
                            .body(), status_code=500)

    def authorized(request: Request) -> bool:
        if cfg.api_key is None:
            return True
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else ""
        return hmac.compare_digest(given.encode(), cfg.api_key.encode())

    def authorize(request: Request) -> None:
        if not authorized(request):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", None,
                           "invalid_api_key")

    async def read_body(request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > cfg.max_body_bytes:
            raise ApiError(413, f"the request body is {length} bytes; the limit is {cfg.max_body_bytes}", None,
                           "request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cfg.max_body_bytes:
                raise ApiError(413, f"the request body exceeds the limit of {cfg.max_body_bytes} bytes", None,
                               "request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    async def read_request(request: Request) -> tuple[object, ChatRequest]:
        """The body (decoded JSON) and the request, read within the body timeout (408 past it), decoded and
        validated off the event loop."""
        try:
            async with asyncio.timeout(cfg.body_timeout_s):
                raw = await read_body(request)
        except TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {cfg.body_timeout_s:g} s", None,
                           "request_timeout", headers={"Connection": "close"}) from None
        except ClientDisconnect:
            raise ApiError(400, "the client closed the connection before the whole body arrived", None,
                           "client_closed") from None
        ctype = request.headers.get("content-type", "application/json")
        body = await asyncio.to_thread(decode_body, raw, ctype)
        return body, await asyncio.to_thread(engine.parse, body)

    def unavailable() -> ApiError | None:
        if drain.started:
            return ApiError(503, "the server is shutting down", None, "server_shutting_down", "server_error")
        if not engine.alive:
            return ApiError(503, f"the engine is not running ({engine.failure or 'stopped'})", None,
                            "engine_stopped", "server_error")
        return None

    @app.get("/", response_class=HTMLResponse)
    async def dashboard():
        return HTMLResponse(_dashboard_html())

    @app.get("/health")
    async def health(request: Request):
        """Liveness and load (503 once the engine's worker is gone or the server drains); the model (it may be a
        local path) only for an authorised caller."""
        down = unavailable()
        out = {"status": "ok" if down is None else "draining" if drain.started else "engine stopped",
               "engine": engine.failure or ("running" if engine.alive else "stopped"),
               "auth": cfg.api_key is not None, "pending": engine.pending, **engine.stats}
        return JSONResponse({**out, "model": engine.model_id} if authorized(request) else out,
                            status_code=200 if down is None else 503)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": engine.model_id, "object": "model", "created": engine.created,
                                            "owned_by": "personascope"}]}

    @app.get("/v1/models/{model_id:path}")
    async def model_info(model_id: str, request: Request):
        authorize(request)
        if model_id != engine.model_id:
            raise ApiError(404, f"the model {model_id!r} does not exist here", "model", "model_not_found")
        return {"id": engine.model_id, "object": "model", "created": engine.created, "owned_by": "personascope"}

    @app.get("/v1/vectors")
    async def vectors(request: Request):
        authorize(request)
        return {"model": engine.model_id, "n_layers": engine.adapter.n_layers, "vectors": engine.vector_info()}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        authorize(request)
        body, req = await read_request(request)
        down = unavailable()
        if down is not None:
            raise down
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if drift is not None:  # the drift monitor and any auto-guard ride on the engine's copy of the request
            req, job = await drift.begin(dict(request.headers), body, req, rid, asyncio.get_running_loop())
        else:
            job = Job(req, asyncio.get_running_loop())
        engine.submit(job)
        drain.jobs.add(job)
        if req.stream:
            async def events():
                try:
                    async for line in stream(engine, req, job, rid):
                        yield line
                finally:
                    drain.jobs.discard(job)

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watcher = asyncio.create_task(cancel_on_disconnect(request, job))
        try:
            return JSONResponse(await complete(engine, req, job, rid))
        finally:
            job.cancelled = True
            drain.jobs.discard(job)
            watcher.cancel()

    if drift is not None:
        drift.add_routes(app, authorize)
    return app


def run_server(engine: Engine, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
               sock: socket.socket | None = None, drift: DriftService | None = None) -> None:
    """Serve with uvicorn until SIGTERM/SIGINT, then drain: no new requests, open ones get `drain_timeout_s` to
    finish and are then ended with a 503 error (JSON, or an SSE error event and [DONE]); a second signal ends
    them at once."""
    import uvicorn

    app = create_app(engine, drift)
    drain: Drain = app.state.drain

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            drain.begin(now=self.should_exit)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=math.ceil(engine.config.drain_timeout_s) + 5)
    Server(config).run(sockets=[sock] if sock is not None else None)
