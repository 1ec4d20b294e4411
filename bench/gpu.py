"""The GPU check: random-weight models of real shapes (built in code, nothing downloaded) and, per size,
extraction tokens/s against a plain forward, steering overhead, HF generation tokens/s by batch size and peak
memory. Writes a JSON and appends a section to RESULTS.md.

    python bench/gpu.py                               # CUDA: 0.5B, 1.5B and 7B, under ~8 min on one H100
    python bench/gpu.py --sizes tiny --device cpu     # the CPU check of the script itself (seconds)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

# Qwen2.5 shapes (config.json of the instruct models); "tiny" checks the script on a CPU
SHAPES: dict[str, dict] = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True),
}


class _Tok:
    """The benchmark feeds token ids only."""

    pad_token_id = 0
    eos_token_id = 1


def build(size: str, device: torch.device, dtype: torch.dtype):
    """A ModelAdapter over a random-weight Qwen2 of the size's shape, on `device` in `dtype`."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from personascope.model import ModelAdapter

    cfg = Qwen2Config(max_position_embeddings=4096, **SHAPES[size])
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval().config.name_or_path = f"random-{size}"
    return ModelAdapter(model, _Tok())


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _best(fn, dev: torch.device, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        _sync(dev)
        t = time.perf_counter()
        fn()
        _sync(dev)
        best = min(best, time.perf_counter() - t)
    return best


def measure(ad, n: int, prompt_len: int, response_len: int, new_tokens: int, batches: list[int],
            repeat: int) -> dict:
    """Every figure for one model: tok/s of extraction and the plain forward, steering overhead, generation."""
    from personascope.model import iter_span_batches, pad_batch, position_ids_for
    from personascope.steering import steer

    dev = ad.device
    vocab = ad.model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    items = [(torch.randint(2, vocab, (prompt_len,), generator=g).tolist(),
              torch.randint(2, vocab, (response_len,), generator=g).tolist()) for _ in range(n)]
    n_tok = n * (prompt_len + response_len)
    bs = min(16, n)

    @torch.no_grad()
    def plain() -> None:
        for s in range(0, n, bs):
            ids, mask = pad_batch([p + r for p, r in items[s : s + bs]], 0, "right")
            ad.model.base_model(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                                position_ids=position_ids_for(mask).to(dev), use_cache=False)

    def extract() -> None:
        for _ in iter_span_batches(ad, items, batch_size=bs):
            pass

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_plain, t_extract = _best(plain, dev, repeat), _best(extract, dev, repeat)
    out: dict = {"forward_tok_s": n_tok / t_plain, "extract_tok_s": n_tok / t_extract,
                 "extract_vs_forward": t_plain / t_extract, "generate": {}}
    v = torch.randn(ad.hidden_size, generator=g)
    layer = round(ad.n_layers * 2 / 3)
    for b in batches:
        ids = torch.randint(2, vocab, (b, prompt_len), generator=g).to(dev)

        @torch.no_grad()
        def gen(ids: torch.Tensor = ids) -> None:
            ad.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

        def gen_steered(gen=gen) -> None:
            with steer(ad, v, layer, 1.0, "response"):
                gen()

        t_gen, t_steer = [], []
        for _ in range(repeat):  # interleaved, so machine noise hits both alike
            t_gen.append(_best(gen, dev, 0) if t_gen else _best(gen, dev, 1))
            t_steer.append(_best(gen_steered, dev, 1))
        rate, steered = b * new_tokens / min(t_gen), b * new_tokens / min(t_steer)
        out["generate"][str(b)] = {"new_tok_s": rate, "steered_new_tok_s": steered,
                                   "steering_overhead_pct": (rate / steered - 1) * 100}
    if dev.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    else:
        import resource

        out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def lines_for(res: dict) -> list[str]:
    """The RESULTS.md table of a run."""
    head = (f"{res['device']}, {res['dtype']}; extraction: {res['n']} sequences × {res['prompt_len']}+"
            f"{res['response_len']} tokens, hooks → 3 spans at every layer; generation: {res['prompt_len']} prompt "
            f"tokens, {res['new_tokens']} new, greedy; steering: one vector at 2/3 depth, positions=response")
    rows = ["| model | forward tok/s | extraction tok/s (× forward) | batch | gen new tok/s | steered | overhead | "
            "peak GiB |", "|---|---|---|---|---|---|---|---|"]
    for size, r in res["models"].items():
        if "error" in r:
            rows.append(f"| {size} | failed: {r['error']} | | | | | | |")
            continue
        mem = r.get("peak_memory_gib", r.get("peak_rss_gib", 0.0))
        for i, (b, gr) in enumerate(r["generate"].items()):
            ext = f"{r['extract_tok_s']:,.0f} (×{r['extract_vs_forward']:.2f})"
            first = f"| {size} | {r['forward_tok_s']:,.0f} | {ext}" if i == 0 else "| | |"
            rows.append(f"{first} | {b} | {gr['new_tok_s']:,.0f} | {gr['steered_new_tok_s']:,.0f} | "
                        f"{gr['steering_overhead_pct']:+.1f} % | {mem:.1f} |")
    return [head, "", *rows]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="0.5b,1.5b,7b")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: the product's choice)")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--response-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,8,32,128")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-gpu.json"))
    ap.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = ap.parse_args(argv)
    from personascope.model import pick_device, pick_dtype

    dev = pick_device(args.device)
    dtype = pick_dtype(dev, args.dtype)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    res: dict = {"device": name, "dtype": str(dtype).removeprefix("torch."), "n": args.n,
                 "prompt_len": args.prompt_len, "response_len": args.response_len, "new_tokens": args.new_tokens,
                 "models": {}}
    for size in args.sizes.split(","):
        t0 = time.perf_counter()
        try:
            ad = build(size, dev, dtype)
            res["models"][size] = measure(ad, args.n, args.prompt_len, args.response_len, args.new_tokens,
                                          [int(b) for b in args.batches.split(",")], args.repeat)
            del ad
        except torch.OutOfMemoryError as e:
            res["models"][size] = {"error": f"out of memory ({str(e).splitlines()[0][:80]})"}
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        res["models"][size]["seconds"] = time.perf_counter() - t0
        print(f"{size}: {json.dumps(res['models'][size])}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    if not args.no_record:
        from common import record

        record("GPU check: random-weight models of real shapes (bench/gpu.py)", lines_for(res))
    print("\n".join(lines_for(res)))
    return res


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
