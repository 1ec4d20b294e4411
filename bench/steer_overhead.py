"""New tokens/s of batched generation with one steering vector vs without (same model, same batch).

    python bench/steer_overhead.py                        # CPU, default model
    python bench/steer_overhead.py --model random-7b      # GPU, random weights of Qwen2.5-7B's shape
"""

from __future__ import annotations

import argparse

import torch
from common import load, record, timed
from rich.console import Console
from rich.table import Table

from personascope.steering import steer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--device", default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    a = load(args.model, args.device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 20000, (args.batch, args.prompt_len), generator=g).to(a.device)
    v = torch.randn(a.hidden_size, generator=g)
    layer = round(a.n_layers * 2 / 3)

    @torch.no_grad()
    def gen():
        a.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                         min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)

    def gen_steered():
        with steer(a, v, layer, 1.0, "response"):
            gen()

    # interleave the two variants so machine noise hits both alike
    plain, steered = [], []
    for _ in range(args.repeat):
        plain.append(timed(gen, repeat=1))
        steered.append(timed(gen_steered, repeat=1))
    n = args.batch * args.new_tokens
    tp, ts = n / min(plain), n / min(steered)
    table = Table(title=f"steering overhead: {a.name}, batch {args.batch}, {args.new_tokens} new tokens")
    table.add_column("variant")
    table.add_column("new tokens/s", justify="right")
    table.add_row("generate", f"{tp:,.1f}")
    table.add_row("generate + steering hook (response)", f"{ts:,.1f}")
    table.add_row("overhead", f"{(tp / ts - 1) * 100:.1f} %")
    Console().print(table)
    record(f"steer_overhead ({a.name}, {next(a.model.parameters()).dtype})",
           ["| variant | new tokens/s |", "|---|---|", f"| generate | {tp:,.1f} |",
            f"| generate + steering hook | {ts:,.1f} |", f"| overhead | {(tp / ts - 1) * 100:.1f} % |"])


if __name__ == "__main__":
    main()
