"""Tokens/s of hooked batched span extraction vs a plain batched forward vs one-at-a-time hidden states.

    python bench/extract_throughput.py                       # CPU, default model
    python bench/extract_throughput.py --model random-7b     # GPU, random weights of Qwen2.5-7B's shape
"""

from __future__ import annotations

import argparse

import torch
from common import load, record, timed
from rich.console import Console
from rich.table import Table

from personascope.model import iter_span_batches, pad_batch, position_ids_for


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--device", default=None)
    ap.add_argument("--n", type=int, default=32, help="sequences")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--response-len", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    a = load(args.model, args.device)
    g = torch.Generator().manual_seed(0)
    items = [(torch.randint(100, 20000, (args.prompt_len,), generator=g).tolist(),
              torch.randint(100, 20000, (args.response_len,), generator=g).tolist()) for _ in range(args.n)]
    n_tok = args.n * (args.prompt_len + args.response_len)
    dev = a.device

    @torch.no_grad()
    def plain():
        for s in range(0, args.n, args.batch_size):
            ids, mask = pad_batch([p + r for p, r in items[s : s + args.batch_size]], 0, "right")
            a.model.base_model(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                               position_ids=position_ids_for(mask).to(dev), use_cache=False)

    def hooked():
        for _ in iter_span_batches(a, items, batch_size=args.batch_size):
            pass

    @torch.no_grad()
    def one_at_a_time():
        for p, r in items[: max(4, args.n // 4)]:
            a.model(input_ids=torch.tensor([p + r], device=dev), output_hidden_states=True)

    t_plain, t_hook = timed(plain), timed(hooked)
    t_single = timed(one_at_a_time, repeat=1) * args.n / max(4, args.n // 4)
    rows = [("batched forward, no capture", n_tok / t_plain), ("batched, hooks → 3 spans, all layers", n_tok / t_hook),
            ("one sequence at a time, output_hidden_states", n_tok / t_single)]
    table = Table(title=f"extraction throughput: {a.name}, {args.n} × {args.prompt_len}+{args.response_len} tokens, "
                        f"batch {args.batch_size}")
    table.add_column("path")
    table.add_column("tokens/s", justify="right")
    for name, tps in rows:
        table.add_row(name, f"{tps:,.0f}")
    table.add_row("ratio hooked / plain", f"{t_plain / t_hook:.3f}")
    Console().print(table)
    record(f"extract_throughput ({a.name}, {next(a.model.parameters()).dtype})",
           ["| path | tokens/s |", "|---|---|"] + [f"| {n} | {t:,.0f} |" for n, t in rows]
           + [f"| ratio hooked / plain | {t_plain / t_hook:.3f} |"])


if __name__ == "__main__":
    main()
