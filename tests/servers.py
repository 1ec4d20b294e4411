"""Real servers for the tests: `personascope serve` as a process, an ASGI app in a thread, tiny vectors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import torch

from personascope.serve import load_serving_model
from personascope.steering.calibration import calibrate_guard, with_calibration
from personascope.vectors.file import PersonaVector, base_metadata

MODEL = "tiny-random-qwen2"
KEY = "test-key-123"
CLI = [sys.executable, "-m", "personascope.cli"]
GUARD_QUESTIONS = ["How do I boil an egg?", "Name a good houseplant.", "Why is the sea salty?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], timeout: float = 300.0) -> tuple[subprocess.Popen, str]:
    """Start `personascope serve ARGS` on a free loopback port; return (process, base URL) once it answers."""
    port = free_port()
    proc = subprocess.Popen([*CLI, "serve", *args, "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "200"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not start in {timeout:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


def tiny_vectors(folder: Path) -> dict[str, Path]:
    """Two random persona vectors that fit the tiny serving model (saved as .safetensors)."""
    adapter = load_serving_model(MODEL)
    g = torch.Generator().manual_seed(3)
    out = {}
    for name, trait in (("opt", "optimistic"), ("hum", "humorous")):
        v = torch.randn(adapter.n_layers + 1, adapter.hidden_size, generator=g)
        v = 4.0 * v / v.norm(dim=-1, keepdim=True)
        pv = PersonaVector({"response_avg": v}, torch.full((adapter.n_layers + 1,), 4.0),
                           base_metadata(adapter, trait, best_layer="2"))
        if name == "opt":  # a guard range from the model's own answers (the median: the guard acts often)
            cal = calibrate_guard(adapter, pv, layer=2, percentile=50, questions=GUARD_QUESTIONS, max_new_tokens=8)
            pv = with_calibration(pv, cal)
        out[name] = pv.save(folder / f"{name}.safetensors")
    return out


class ThreadServer:
    """A real uvicorn server for an ASGI app, in a thread on a free loopback port."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
