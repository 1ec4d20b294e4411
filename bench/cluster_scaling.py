"""Rows/s of `screen --method last-token` in one process and on 1 vs 2 local Ray workers; driver memory vs rows.

    python bench/cluster_scaling.py                          # a small random qwen2 (no download)
    python bench/cluster_scaling.py --model qwen2.5-coder-0.5b --rows 96

Each configuration screens the same synthetic chat rows with one random vector. Ray start-up and
model loading are timed apart from the screening itself (a warm-up chunk runs first on every actor).
The memory part screens N and 4×N rows on 2 workers and reports the driver's tracemalloc peak.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import torch
from common import record

from personascope.runtime.cluster import ModelSpec, RayCluster
from personascope.screen import ScreenConfig, screen_dataset
from personascope.vectors import PersonaVector

TESTS = Path(__file__).resolve().parents[1] / "tests"


def model_dir(name: str, root: Path) -> str:
    """A built-in or local model as is; 'tiny' is a random qwen2 (hidden 256, 6 layers) saved under root."""
    if name != "tiny":
        return name
    sys.path.insert(0, str(TESTS))
    from tiny import tiny_pair

    model, tok = tiny_pair("qwen2", hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                           num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048)
    model.save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    return str(root / "tiny")


def write_rows(path: Path, n: int) -> Path:
    with path.open("w") as f:
        for i in range(n):
            q = f"Question {i}: how should I plan a trip to city number {i % 37}?" + " Please be detailed." * (i % 3)
            a = f"Start by choosing dates, then book travel {i}." + " Pack light and check the weather." * (1 + i % 4)
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                    + "\n")
    return path


def vector(adapter) -> dict[str, PersonaVector]:
    g = torch.Generator().manual_seed(0)
    vecs = {s: torch.randn(adapter.n_layers + 1, adapter.hidden_size, generator=g)
            for s in ("response_avg", "prompt_avg", "prompt_last")}
    return {"trait": PersonaVector(vecs, torch.ones(adapter.n_layers + 1), {"trait": "optimistic"})}


def screen(adapter, data: Path, out: Path, cfg: ScreenConfig, cluster=None) -> float:
    t = time.perf_counter()
    screen_dataset(adapter, data, vector(adapter), layer=adapter.n_layers // 2, method="last-token", out_dir=out,
                   config=cfg, plots=False, force=True, cluster=cluster)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtype", default="fp32")
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="cluster-bench-"))
    spec = ModelSpec(model_dir(args.model, root), device="cpu", dtype=args.dtype)
    data = write_rows(root / "rows.jsonl", args.rows)
    warm = write_rows(root / "warm.jsonl", 2 * args.chunk)
    cfg = ScreenConfig(method="last-token", batch_size=args.batch, chunk_size=args.chunk, n_boot=10)
    lines = [f"{args.rows} synthetic chat rows, chunk {args.chunk}, batch {args.batch}, model {args.model} "
             f"({args.dtype}, 1 torch thread per process); screening time only (start-up listed apart).", "",
             "| run | workers | start-up (s) | seconds | rows/s | speed-up |", "|---|---|---|---|---|---|"]
    local = spec.load()
    screen(local, warm, root / "w0", cfg)
    base = screen(local, data, root / "one", cfg)
    lines.append(f"| single process | – | – | {base:.1f} | {args.rows / base:.1f} | 1.00 |")
    del local
    peaks = {}
    for w in (1, 2):
        t = time.perf_counter()
        with RayCluster(spec, workers=w) as cluster:
            adapter = cluster.driver_adapter()
            start = time.perf_counter() - t
            screen(adapter, warm, root / f"w{w}", cfg, cluster)
            s = screen(adapter, data, root / f"ray{w}", cfg, cluster)
            assert (root / f"ray{w}" / "deltas.jsonl").read_bytes() == (root / "one" / "deltas.jsonl").read_bytes()
            lines.append(f"| Ray | {w} | {start:.1f} | {s:.1f} | {args.rows / s:.1f} | {base / s:.2f} |")
            if w == 2:
                for n in (args.rows // 4, args.rows):
                    d = write_rows(root / f"mem{n}.jsonl", n)
                    tracemalloc.start()
                    screen(adapter, d, root / f"mem{n}", cfg, cluster)
                    peaks[n] = tracemalloc.get_traced_memory()[1] / 2**20
                    tracemalloc.stop()
        print("\n".join(lines), flush=True)
    lines += ["", "Driver memory (2 workers; tracemalloc peak of the screening call):", "",
              "| rows | driver peak (MiB) |", "|---|---|"]
    lines += [f"| {n} | {p:.2f} |" for n, p in peaks.items()]
    lines += ["", "deltas.jsonl of every Ray run is byte-identical to the single-process one (asserted)."]
    print("\n".join(lines))
    record("cluster_scaling: screen --method last-token, 1 vs 2 local Ray workers", lines)


if __name__ == "__main__":
    main()
