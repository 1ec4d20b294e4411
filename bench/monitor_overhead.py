"""What drift recording costs a served completion: `serve` without and with `--monitor`, A/B interleaved.

Two servers of the same model run side by side (one plain, one recording every completion's trajectory on two
vectors into SQLite); rounds alternate between them, the order swapping every round, so load from other jobs on a
shared machine falls on both arms alike. Requests are serve_load's (same seeds, half steered), so the two arms
generate the same tokens. Reports mean latency per arm and level, the ratio with a bootstrap interval over rounds,
and the database's row count against the acknowledged completions.

    python bench/monitor_overhead.py --model qwen2.5-coder-0.5b          # about 10 min on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import record
from serve_load import level, random_vectors, start


def ratio_ci(pairs: list[tuple[float, float]], n_boot: int = 2000) -> tuple[float, float, float]:
    """mean(B) / mean(A) over rounds and its 95 % bootstrap interval (rounds resampled)."""
    rng = random.Random(0)

    def r(s):
        return statistics.fmean(b for _, b in s) / statistics.fmean(a for a, _ in s)

    boots = sorted(r([rng.choice(pairs) for _ in pairs]) for _ in range(n_boot))
    return r(pairs), boots[int(0.025 * n_boot)], boots[int(0.975 * n_boot) - 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--levels", default="1,8")
    ap.add_argument("--rounds", type=int, default=6, help="A/B rounds per level")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    deadline = time.monotonic() + 3600
    with tempfile.TemporaryDirectory() as tmp:
        vecs = random_vectors(args.model, Path(tmp))
        db = Path(tmp) / "drift.sqlite3"
        plain, url_a = start(args.model, vecs, 16, None)
        mon, url_b = start(
            args.model, vecs, 16, None, ("--monitor", "a,b", "--drift-db", str(db), "--drift-calibrate", "0")
        )
        results, acked = [], 0
        try:
            for c in [int(x) for x in args.levels.split(",")]:
                pairs = []
                for k in range(args.rounds):
                    got = {}
                    for arm, url in (("A", url_a), ("B", url_b)) if k % 2 == 0 else (("B", url_b), ("A", url_a)):
                        got[arm] = asyncio.run(level(url, args.model, c, 2 * c, args.max_tokens, deadline))
                    acked += got["B"]["requests"] + 1  # the warm-up is a completion too
                    pairs.append((got["A"]["mean"], got["B"]["mean"]))
                    print(
                        f"{c} clients, round {k}: plain {got['A']['mean']:.3f} s, monitored {got['B']['mean']:.3f} s",
                        file=sys.stderr,
                        flush=True,
                    )
                results.append((c, pairs))
        finally:
            for p in (plain, mon):
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
        kept = sqlite3.connect(db).execute("SELECT COUNT(*) FROM turns").fetchone()[0]
    flags = " ".join(f for f in ("avx2", "avx512_bf16", "amx_bf16") if f in Path("/proc/cpuinfo").read_text().split())
    title = (
        f"monitor_overhead: {args.model}, serve vs serve --monitor a,b (SQLite), A/B interleaved, "
        f"max_tokens {args.max_tokens}"
    )
    lines = [
        f"CPU flags `{flags}`, {os.cpu_count()} cores, load average at the end {os.getloadavg()[0]:.1f}; "
        f"{args.rounds} rounds per level, 2 × clients requests per arm per round, order swapped every round.",
        "",
        "| clients | plain: mean latency (s) | monitored (s) | monitored / plain [95 % CI over rounds] |",
        "|---|---|---|---|",
    ]
    for c, pairs in results:
        r, lo, hi = ratio_ci(pairs)
        lines.append(
            f"| {c} | {statistics.fmean(a for a, _ in pairs):.3f} | {statistics.fmean(b for _, b in pairs):.3f}"
            f" | {r:.3f} [{lo:.3f}, {hi:.3f}] |"
        )
    lines.append(f"\nDrift database: {kept} turn rows for {acked} acknowledged monitored completions.")
    print("\n".join(lines))
    if not args.no_record:
        record(title, lines)


if __name__ == "__main__":
    main()
