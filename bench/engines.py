"""HF vs vLLM: generation tokens/s on the 0.5B and judge seconds per judgement on the 1.5B, plus agreement.

Each variant runs in its own process (vLLM pins threads and seeds RNGs in-process), writes its texts or
scores to --work, and the driver compares them and appends a section to RESULTS.md. Needs an environment
with vLLM (docs/engines.md); without it the vLLM rows are skipped.

    python bench/engines.py                       # everything (about 15 min on 2 CPU cores)
    python bench/engines.py --part gen-hf16       # one variant (used by the driver)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

GEN_MODEL, JUDGE_MODEL = os.environ.get("BENCH_GEN_MODEL", "qwen2.5-coder-0.5b"), "qwen2.5-coder-1.5b"
N_ANSWERS, NEW_TOKENS = int(os.environ.get("BENCH_N", "64")), int(os.environ.get("BENCH_NEW_TOKENS", "64"))
N_JUDGE = int(os.environ.get("BENCH_N_JUDGE", "32"))
EAGER = os.environ.get("BENCH_VLLM_EAGER", "1") == "1"  # eager (steerable) vLLM: no graph compilation
# float32 by default: the product's CPU dtype (a CPU without native bf16 matmul, like AVX2-only EPYC, runs bf16 slower)
DTYPE = os.environ.get("BENCH_DTYPE", "float32")
PARTS = ("gen-auto", "gen-hf16", "gen-hf64", "gen-hfauto", "gen-hf-bf16", "gen-hf-fp32", "gen-vllm", "gen-vllm-raw",
         "judge-hf", "judge-hfengine", "judge-vllm")
PART_DTYPE = {"gen-hf-bf16": "bfloat16", "gen-hf-fp32": "float32"}  # these ignore BENCH_DTYPE


def cpu_flags() -> str:
    """The CPU flags that decide bf16's speed (recorded with every figure)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "?"
    return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags) or "none"


def gen_prompts(ad) -> list[str]:
    from personascope.traits import load_trait

    t = load_trait("optimistic")
    jobs = [(t.system_prompt(side, i), q) for side in ("pos", "neg") for i in range(4) for q in t.extract_questions]
    return [ad.prompt(q, system) for system, q in jobs[:N_ANSWERS]]


def judge_requests():
    from personascope.judges import JudgeRequest, labelled_set
    from personascope.traits import load_trait

    t = load_trait("optimistic")
    return [JudgeRequest("trait", r["question"], r["answer"], t) for r in labelled_set("optimistic")[:N_JUDGE]]


def run_part(part: str, work: Path) -> dict:
    import torch

    from personascope.model import ModelAdapter, SamplingConfig, generate_batch, load_model, resolve_model_path
    from personascope.runtime.engines import HFEngine

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    name = GEN_MODEL if part.startswith("gen") else JUDGE_MODEL
    model, tok = load_model(name, device="cpu", dtype=getattr(torch, PART_DTYPE.get(part, DTYPE)))
    ad = ModelAdapter(model, tok)
    res: dict = {"part": part}
    t0 = time.perf_counter()
    if part.startswith("gen"):
        prompts = gen_prompts(ad)
        cfg = SamplingConfig(temperature=0.0, max_new_tokens=NEW_TOKENS)
        if part == "gen-vllm":
            from personascope.runtime.engines import VLLMEngine

            eng = VLLMEngine(resolve_model_path(name), tokenizer=tok, dtype=getattr(torch, DTYPE), max_model_len=2048,
                             steerable=EAGER)
            res["startup_s"] = time.perf_counter() - t0
            eng.generate(prompts[:2], SamplingConfig(temperature=0.0, max_new_tokens=4))  # warm-up
            t0 = time.perf_counter()
            texts = eng.generate(prompts, cfg)
        elif part == "gen-vllm-raw":  # the anchor: raw vllm.LLM, compiled, on the same token ids
            from vllm import LLM, SamplingParams
            from vllm.inputs import TokensPrompt

            from personascope.runtime.engines import memory_kw

            llm = LLM(model=resolve_model_path(name), dtype=DTYPE, max_model_len=2048, seed=0,
                      enable_prefix_caching=True, disable_log_stats=True, **memory_kw())
            res["startup_s"] = time.perf_counter() - t0
            toks = [TokensPrompt(prompt_token_ids=ad.encode_prompt(p)) for p in prompts]
            sp = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, detokenize=False)
            llm.generate(toks[:2], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
            t0 = time.perf_counter()
            outs = llm.generate(toks, sp, use_tqdm=False)
            texts = [tok.decode(list(o.outputs[0].token_ids), skip_special_tokens=True).strip() for o in outs]
        elif part == "gen-auto":  # the product's `--engine auto`: engine and dtype chosen by the cached calibration
            from personascope.runtime.engines import make_engine, resolve_engine

            model, tok = load_model(name, device="cpu")  # the product's own load, before the choice casts it
            ad = ModelAdapter(model, tok)
            choice = resolve_engine("auto", ad, len(prompts) * NEW_TOKENS)
            res["choice"] = choice.line()
            eng = make_engine(choice.engine, ad, len(prompts) * NEW_TOKENS, max_model_len=2048)
            res["startup_s"] = time.perf_counter() - t0
            eng.generate(prompts[:2], SamplingConfig(temperature=0.0, max_new_tokens=4))  # warm-up
            t0 = time.perf_counter()
            texts = eng.generate(prompts, cfg)
        elif part == "gen-hf16":  # the product's path before engines: sorted by length, batches of 16
            order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
            texts = [""] * len(prompts)
            for s in range(0, len(order), 16):
                idx = order[s : s + 16]
                for i, a in zip(idx, generate_batch(ad, [prompts[i] for i in idx], NEW_TOKENS, 0.0), strict=True):
                    texts[i] = a
        else:
            eng = HFEngine(ad, batch_size=64 if part == "gen-hf64" else None)
            res["batch"] = eng.rows_per_batch(200 + NEW_TOKENS)
            texts = eng.generate(prompts, cfg)
        res["seconds"] = time.perf_counter() - t0
        res["tokens"] = sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)
        res["tok_per_s"] = res["tokens"] / res["seconds"]
        res["texts"] = texts
    else:
        from personascope.judges import LocalJudge

        reqs = judge_requests()
        judge = LocalJudge(model, tok, trait_mode="binary", name=f"local:{name}")
        prompts = [judge._judge_prompt(r, "binary") for r in reqs]
        res["prompt_tokens"] = sum(len(ad.encode_prompt(p)) for p in prompts)
        if part == "judge-vllm":
            from personascope.runtime.engines import VLLMEngine

            judge.engine = VLLMEngine(resolve_model_path(name), tokenizer=tok, dtype=getattr(torch, DTYPE),
                                      max_model_len=2048, steerable=EAGER)
            res["startup_s"] = time.perf_counter() - t0
            judge.engine.last_token_logprobs(prompts[:1])  # warm-up (also caches the rubric prefix, as in use)
        elif part == "judge-hfengine":
            judge.engine = HFEngine(ad)
        t0 = time.perf_counter()
        scores = []
        for s in range(0, len(reqs), 8):  # judge_answers hands the judge 8 requests at a time
            scores += judge.score(reqs[s : s + 8])
        res["seconds"] = time.perf_counter() - t0
        res["s_per_judgement"] = res["seconds"] / len(reqs)
        res["prompt_tok_per_s"] = res["prompt_tokens"] / res["seconds"]
        res["scores"] = scores
    (work / f"{part}.json").write_text(json.dumps(res))
    return res


def drive(parts: list[str], work: Path) -> None:
    from common import record

    work.mkdir(parents=True, exist_ok=True)
    threads = os.environ.get("BENCH_THREADS", "2")
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": threads}
    for part in parts:
        if "vllm" in part:
            import importlib.util

            if importlib.util.find_spec("vllm") is None:
                print(f"skip {part}: vLLM is not installed")
                continue
        print(f"running {part} …", flush=True)
        subprocess.run([sys.executable, __file__, "--part", part, "--work", str(work)], check=True, env=env)
    got = {p: json.loads((work / f"{p}.json").read_text()) for p in PARTS if (work / f"{p}.json").exists()}
    lines = [f"{N_ANSWERS} answers × {NEW_TOKENS} new tokens greedy on {GEN_MODEL}; {N_JUDGE} binary judge prompts "
             f"(optimistic, labelled set) on {JUDGE_MODEL}; {DTYPE} unless the variant names a dtype; CPU flags "
             f"`{cpu_flags()}`; one run each, each in a fresh process; "
             f"load average at the end {os.getloadavg()[0]:.1f}; vLLM {'eager' if EAGER else 'compiled'}; "
             f"torch threads {os.environ.get('BENCH_THREADS', '2')}", "",
             "| variant | seconds | rate | start-up (s) |", "|---|---|---|---|"]
    labels = {"gen-auto": "product `--engine auto`", "gen-hf16": "HF, product path (batch 16)",
              "gen-hf64": "HFEngine, batch 64",
              "gen-hfauto": "HFEngine, batch from memory", "gen-vllm": "VLLMEngine",
              "gen-hf-bf16": "HFEngine, batch from memory, bf16", "gen-hf-fp32": "HFEngine, batch from memory, fp32",
              "gen-vllm-raw": "raw vllm.LLM, compiled (anchor)",
              "judge-hf": "HF judge, product path (batch 4)", "judge-hfengine": "HFEngine judge (shared prefix)",
              "judge-vllm": "VLLMEngine judge (prefix caching)"}
    for p, r in got.items():
        rate = (f"{r['tok_per_s']:.1f} tok/s" + (f" (batch {r['batch']})" if "batch" in r else "")
                if "tok_per_s" in r else f"{r['s_per_judgement']:.2f} s/judgement ({r['prompt_tok_per_s']:.0f} "
                                         "prompt tok/s)")
        lines.append(f"| {labels[p]} | {r['seconds']:.1f} | {rate} | {r.get('startup_s', 0):.0f} |")
    lines.append("")
    if "gen-auto" in got:  # the target: auto at least as fast as the best of the HF engine and raw vLLM here
        best = max((p for p in ("gen-hfauto", "gen-hf-bf16", "gen-hf-fp32", "gen-vllm-raw") if p in got),
                   key=lambda p: got[p]["tok_per_s"], default=None)
        lines.append(f"- auto chose: {got['gen-auto']['choice']}")
        if best:
            lines.append(f"- auto vs the best other variant here ({labels[best]}): speed "
                         f"×{got['gen-auto']['tok_per_s'] / got[best]['tok_per_s']:.2f}")
    ref = next((p for p in ("gen-hf16", "gen-hfauto", "gen-hf64", "gen-hf-fp32") if p in got), None)
    base = got.get(ref) if ref else None
    for p in ("gen-hf64", "gen-hfauto", "gen-hf-bf16", "gen-vllm", "gen-vllm-raw"):
        if base and p in got and p != ref:
            same = sum(a == b for a, b in zip(base["texts"], got[p]["texts"], strict=True)) / len(base["texts"])
            lines.append(f"- {labels[p]} vs {labels[ref]}: greedy text identical on {100 * same:.0f} % of "
                         f"{len(base['texts'])}, speed ×{got[p]['tok_per_s'] / base['tok_per_s']:.2f}")
    jref = next((p for p in ("judge-hf", "judge-hfengine") if p in got), None)
    jb = got.get(jref) if jref else None
    for p in ("judge-hfengine", "judge-vllm"):
        if jb and p in got and p != jref:
            diffs = [abs(a - b) for a, b in zip(jb["scores"], got[p]["scores"], strict=True)
                     if a is not None and b is not None]
            missing = sum((a is None) != (b is None) for a, b in zip(jb["scores"], got[p]["scores"], strict=True))
            lines.append(f"- {labels[p]} vs {labels[jref]}: judge score max |diff| {max(diffs):.2f} points "
                         f"(mean {sum(diffs) / len(diffs):.2f}; {missing} missing on one side only), "
                         f"speed ×{jb['seconds'] / got[p]['seconds']:.2f}")
    record("engines: HF vs vLLM (bench/engines.py)", lines)
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--part", choices=PARTS)
    ap.add_argument("--only", nargs="*", choices=PARTS, help="run these variants only (default: all)")
    ap.add_argument("--work", type=Path, default=Path("runs/bench-engines"))
    ap.add_argument("--report", action="store_true", help="only compare the variants already in --work and record")
    args = ap.parse_args()
    if args.part:
        r = run_part(args.part, args.work)
        print({k: v for k, v in r.items() if k not in ("texts", "scores")})
    else:
        drive([] if args.report else args.only or list(PARTS), args.work)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
