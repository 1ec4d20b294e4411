"""The server's life at its edges: the listening socket (bound before the model loads) and the drain at shutdown."""

from __future__ import annotations

import asyncio
import logging
import socket
import time

from .jobs import Job
from .wire import ApiError

log = logging.getLogger(__name__)


class Drain:
    """The app's open chat requests and, once shutdown begins, the deadline by which they must end."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.jobs: set[Job] = set()
        self.started = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.task: asyncio.Task | None = None

    def begin(self, now: bool = False) -> None:
        """Start draining (thread- and signal-safe): new requests get 503, open ones end by the deadline."""
        if self.loop is None or self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self._begin, now)

    def _begin(self, now: bool) -> None:
        self.started = True
        if now:
            self.end_open()
        elif self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._wait())

    async def _wait(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while self.jobs and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.end_open()

    def end_open(self) -> None:
        if self.jobs:
            log.warning("ending %d open request(s) at shutdown", len(self.jobs))
        for job in list(self.jobs):
            job.fail(ApiError(503, f"the server is shutting down; the request did not finish within the "
                              f"{self.timeout_s:g} s drain", None, "server_shutting_down", "server_error"))


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (OSError, with the system's reason, when it cannot be had)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock
