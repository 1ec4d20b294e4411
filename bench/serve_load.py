"""Load test of `personascope serve`: requests/s and latency p50/p95 at 1, 8 and 32 concurrent clients.

Starts its own server on 127.0.0.1 (a free port), sends chat completions over loopback only, and
stops by itself (a fixed number of requests per level and an overall time limit). Half of the
requests steer with one of two vectors at different coefficients, so batches mix steering.

    python bench/serve_load.py                                 # tiny random model (fast, measures the server)
    python bench/serve_load.py --model qwen2.5-coder-0.5b      # a real model (run under flock on shared CPUs)
    python bench/serve_load.py --monitor                       # with drift recording (SQLite), rows counted
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import torch
from common import record
from rich.console import Console
from rich.table import Table

from personascope.serve import load_serving_model
from personascope.vectors import PersonaVector, base_metadata

QUESTIONS = ["Tell me about the sea.", "How do I bake bread?", "What is a good name for a cat?",
             "Explain rain to a child.", "Give me a tip for learning chess.", "Why do leaves change colour?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_vectors(model: str, folder: Path) -> list[str]:
    """Two random vectors that fit the model (they only need to exercise the steering path)."""
    a = load_serving_model(model)
    g = torch.Generator().manual_seed(0)
    specs = []
    for name in ("a", "b"):
        v = torch.randn(a.n_layers + 1, a.hidden_size, generator=g)
        pv = PersonaVector({"response_avg": v}, v.norm(dim=-1), base_metadata(a, name))
        specs.append(f"{name}={pv.save(folder / f'{name}.safetensors')}")
    del a
    return specs


def start(model: str, vectors: list[str], max_batch: int, device: str | None,
          extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "personascope.cli", "serve", "--model", model, "--host", "127.0.0.1", "--port",
           str(port), "--max-batch", str(max_batch)]
    for v in vectors:
        cmd += ["--vector", v]
    if device:
        cmd += ["--device", device]
    cmd += list(extra)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("the server did not start within 600 s")


def body(model: str, i: int, max_tokens: int) -> dict:
    b = {"model": model, "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
         "max_tokens": max_tokens, "temperature": 0.8, "seed": i,
         "conversation_id": uuid.uuid4().hex}  # one conversation per request (ignored without --monitor)
    if i % 2:
        b["steering"] = [{"vector": "ab"[(i // 2) % 2], "alpha": [-0.5, 0.25, 0.5][i % 3]}]
    return b


async def level(url: str, model: str, clients: int, n_requests: int, max_tokens: int, deadline: float) -> dict:
    """n_requests spread over `clients` concurrent loops; each waits for its answer before the next."""
    latencies: list[float] = []
    tokens = 0
    counter = iter(range(n_requests))
    errors = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens, errors
        for i in counter:
            if time.monotonic() > deadline:
                return
            t = time.perf_counter()
            r = await http.post(url + "/v1/chat/completions", json=body(model, i, max_tokens))
            if r.status_code != 200:
                errors += 1
                continue
            latencies.append(time.perf_counter() - t)
            tokens += r.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        await http.post(url + "/v1/chat/completions", json=body(model, 0, 4))  # warm-up
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
    lat = sorted(latencies)
    pct = (lambda q: lat[min(len(lat) - 1, round(q * (len(lat) - 1)))]) if lat else (lambda q: float("nan"))
    return {"clients": clients, "requests": len(lat), "errors": errors, "rps": len(lat) / wall,
            "tok_s": tokens / wall, "p50": pct(0.50), "p95": pct(0.95),
            "mean_tokens": tokens / max(1, len(lat)), "mean": statistics.fmean(lat) if lat else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-random-qwen2")
    ap.add_argument("--device", default=None)
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--requests", type=int, default=0, help="Requests per level (default: max(24, 3 x clients)).")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--time-limit", type=float, default=600.0, help="Stop issuing requests after this many s.")
    ap.add_argument("--no-record", action="store_true", help="Print only; do not append to RESULTS.md.")
    ap.add_argument("--monitor", action="store_true", help="Record every completion's drift trajectory on both "
                    "vectors (serve --monitor a,b, SQLite in a temporary folder) and count the rows at the end.")
    args = ap.parse_args()
    deadline = time.monotonic() + args.time_limit
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "drift.sqlite3"
        extra = ("--monitor", "a,b", "--drift-db", str(db), "--drift-calibrate", "0") if args.monitor else ()
        proc, url = start(args.model, random_vectors(args.model, Path(tmp)), args.max_batch, args.device, extra)
        try:
            rows = []
            for c in [int(x) for x in args.levels.split(",")]:
                n = args.requests or max(24, 3 * c)
                rows.append(asyncio.run(level(url, args.model, c, n, args.max_tokens, deadline)))
            stats = httpx.get(url + "/health").json()
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        if args.monitor:
            import sqlite3

            kept = sqlite3.connect(db).execute("SELECT COUNT(*) FROM turns").fetchone()[0]
    title = (f"serve_load: {args.model}, max_tokens {args.max_tokens}, max_batch {args.max_batch}, "
             "half the requests steered" + (", drift recording on (--monitor a,b, SQLite)" if args.monitor else ""))
    table = Table(title=title)
    for col in ("clients", "requests", "errors", "req/s", "new tok/s", "p50 s", "p95 s", "tokens/answer"):
        table.add_column(col, justify="right")
    lines = ["| clients | requests | errors | req/s | new tok/s | latency p50 (s) | latency p95 (s) | tokens/answer |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [str(r["clients"]), str(r["requests"]), str(r["errors"]), f"{r['rps']:.2f}", f"{r['tok_s']:.1f}",
                 f"{r['p50']:.3f}", f"{r['p95']:.3f}", f"{r['mean_tokens']:.1f}"]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\nServer: {stats['batches']} batches, {stats['rows']} rows, largest batch {stats['max_batch_rows']} "
                 "rows. Sampling at temperature 0.8 with a seed per request; steering alternates two random vectors.")
    if args.monitor:  # every acknowledged completion is a row (the warm-ups too: one per level)
        done = sum(r["requests"] for r in rows) + len(rows)
        lines.append(f"Drift database: {kept} turn rows for {done} completed requests (warm-ups included).")
    Console().print(table)
    if args.monitor:
        print(lines[-1])
    if not args.no_record:
        record(title, lines)


if __name__ == "__main__":
    main()
