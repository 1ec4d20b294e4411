"""Samples/s of data screening (generate vs last-token) and peak memory for N vs 10×N rows.

    python bench/screen_throughput.py                       # CPU, default model
    python bench/screen_throughput.py --model random-7b     # GPU, random weights of Qwen2.5-7B's shape

Throughput rows are prompt/response pairs from data/mistakes.jsonl (question, correct answer).
Random-weight models get the byte-level test tokenizer (tests/tiny.py), with generated ids folded
onto bytes so their own answers have full length. The memory part screens N and 10×N synthetic
rows with the last-token method on a tiny random model, each in a fresh subprocess, and reports
the tracemalloc peak (Python and numpy objects) and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from importlib import resources
from pathlib import Path

import torch
from common import load, machine, record
from rich.console import Console
from rich.table import Table

from personascope.model import ModelAdapter
from personascope.screen import ScreenConfig, screen_dataset
from personascope.vectors import PersonaVector

TESTS = Path(__file__).resolve().parents[1] / "tests"


class FoldedTokenizer:
    """The byte-level test tokenizer, decoding any id (of a large random model) as a byte."""

    def __init__(self, tok):
        self.tok = tok
        self.pad_token_id, self.eos_token_id, self.chat_template = tok.pad_token_id, tok.eos_token_id, tok.chat_template

    def __call__(self, *args, **kw):
        return self.tok(*args, **kw)

    def apply_chat_template(self, *args, **kw):
        return self.tok.apply_chat_template(*args, **kw)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode([int(i) % 256 for i in ids], skip_special_tokens=skip_special_tokens)


def _tiny_tokenizer():
    sys.path.insert(0, str(TESTS))
    from tiny import tiny_tokenizer

    return tiny_tokenizer()


def load_adapter(model: str, device: str | None) -> ModelAdapter:
    """A built-in model, or random weights ('random-7b'; 'random-small' to try the GPU path on a CPU)."""
    if model == "random-small":
        from transformers import AutoModelForCausalLM, Qwen2Config

        cfg = Qwen2Config(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=4096, max_position_embeddings=2048)
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
        m.config.name_or_path = "random-small"
        a = ModelAdapter(m, None)
    else:
        a = load(model, device)
    if model.startswith("random"):
        a.tokenizer = FoldedTokenizer(_tiny_tokenizer())
    return a


def random_vector(a: ModelAdapter, trait: str = "bench") -> PersonaVector:
    g = torch.Generator().manual_seed(0)
    return PersonaVector({"response_avg": torch.randn(a.n_layers + 1, a.hidden_size, generator=g)}, None,
                         {"trait": trait})


def write_rows(path: Path, n: int) -> Path:
    src = Path(str(resources.files("personascope") / "data" / "mistakes.jsonl"))
    rows = [json.loads(x) for x in src.read_text().splitlines() if x.strip()]
    with path.open("w") as f:
        for i in range(n):
            r = rows[i % len(rows)]
            f.write(json.dumps({"prompt": r["question"], "response": r["correct_answer"]}) + "\n")
    return path


def throughput(a: ModelAdapter, n: int, max_new_tokens: int, batch_size: int) -> list[tuple[str, float, float]]:
    """(method, samples/s, seconds) for each method, best of two runs after a warm-up on 2 rows."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data, warm = write_rows(tmp / "rows.jsonl", n), write_rows(tmp / "warm.jsonl", 2)
        pv = random_vector(a)
        for method in ("last-token", "generate"):
            cfg = ScreenConfig(method=method, batch_size=batch_size, max_new_tokens=max_new_tokens)
            screen_dataset(a, warm, {"bench": pv}, method=method, out_dir=tmp / "warm", config=cfg,
                           force=True, plots=False)
            best = float("inf")
            for rep in range(2):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                t = time.perf_counter()
                screen_dataset(a, data, {"bench": pv}, method=method, out_dir=tmp / f"{method}{rep}",
                               config=cfg, plots=False)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t)
            out.append((method, n / best, best))
    return out


def memory_child(rows: int) -> None:
    """Screen `rows` synthetic rows (last-token, tiny model); print peak memory as JSON."""
    sys.path.insert(0, str(TESTS))
    from tiny import tiny_pair

    torch.set_num_threads(1)
    m, tok = tiny_pair("qwen2")
    a = ModelAdapter(m, tok)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_rows(Path(tmp) / "rows.jsonl", rows)
        tracemalloc.start()
        t = time.perf_counter()
        res = screen_dataset(a, data, {"bench": random_vector(a)}, method="last-token", out_dir=Path(tmp) / "out",
                             config=ScreenConfig(method="last-token", batch_size=16), plots=False,
                             percentile=95)
        seconds = time.perf_counter() - t
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    print(json.dumps({"rows": rows, "screened": res.n_screened, "tracemalloc_peak_mb": peak / 2**20,
                      "max_rss_mb": peak_rss_mb(), "seconds": seconds}))


def peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM (reset at exec, unlike ru_maxrss, which keeps the parent's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory(n: int) -> list[dict]:
    out = []
    for rows in (n, 10 * n):
        proc = subprocess.run([sys.executable, __file__, "--memory-child", str(rows)], capture_output=True, text=True,
                              check=True)
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--device", default=None)
    ap.add_argument("--n", type=int, default=16, help="rows for the throughput measurement")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--mem-rows", type=int, default=500, help="N for the memory check (N and 10×N rows)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md (for trial runs)")
    ap.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child is not None:
        memory_child(args.memory_child)
        return
    a = load_adapter(args.model, args.device)
    dtype = next(a.model.parameters()).dtype
    tp = throughput(a, args.n, args.max_new_tokens, args.batch_size)
    mem = [] if args.skip_memory else memory(args.mem_rows)
    console = Console()
    table = Table(title=f"screening throughput: {a.name} ({dtype}), {args.n} rows, batch {args.batch_size}, "
                        f"≤ {args.max_new_tokens} new tokens — {machine()}")
    for c in ("method", "samples/s", "seconds"):
        table.add_column(c)
    for method, sps, sec in tp:
        table.add_row(method, f"{sps:.2f}", f"{sec:.1f}")
    console.print(table)
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [f"{args.n} rows (mistakes.jsonl prompt/response), batch {args.batch_size}, generate method ≤ "
             f"{args.max_new_tokens} new tokens (greedy); load average at the end {load1:.1f}", "",
             "| method | samples/s | seconds |", "|---|---|---|"]
    lines += [f"| {m} | {s:.2f} | {t:.1f} |" for m, s, t in tp]
    if mem:
        mt = Table(title="peak memory, last-token method, tiny random model, chunks of 256 rows")
        for c in ("rows", "tracemalloc peak (MiB)", "max RSS (MiB)", "seconds"):
            mt.add_column(c)
        for r in mem:
            mt.add_row(str(r["rows"]), f"{r['tracemalloc_peak_mb']:.2f}", f"{r['max_rss_mb']:.0f}",
                       f"{r['seconds']:.1f}")
        console.print(mt)
        lines += ["", "Peak memory, last-token method on a tiny random model (each size in a fresh process):", "",
                  "| rows | tracemalloc peak (MiB) | max RSS (MiB) | seconds |", "|---|---|---|---|"]
        lines += [f"| {r['rows']} | {r['tracemalloc_peak_mb']:.2f} | {r['max_rss_mb']:.0f} | {r['seconds']:.1f} |"
                  for r in mem]
    if not args.no_record:
        record(f"screen_throughput ({a.name}, {dtype})", lines)


if __name__ == "__main__":
    main()
