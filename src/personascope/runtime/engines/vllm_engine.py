"""The vLLM engine: an in-process `vllm.LLM` (prefix caching on) on the same weights as the HF model.

Prompts go in as the token ids the HF tokenizer makes, and answers come back decoded by it, so both
engines see and write the same text. Constant steering at `positions=all` runs as hooks on vLLM's
decoder layers (needs `steerable=True`, i.e. no compiled graph); any other steering falls back to
the HF engine with a message.
"""

from __future__ import annotations

import contextlib
import os
import random
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from personascope.steering import SteeringSpec

STEERABLE_POSITIONS = ("all",)


@contextlib.contextmanager
def _keep_caller_state() -> Iterator[None]:
    """vLLM seeds the global RNGs and replaces `torch.set_num_threads` in-process; undo both after."""
    import numpy as np

    py, npy, thr, set_threads = random.getstate(), np.random.get_state(), torch.get_num_threads(), torch.set_num_threads
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)
            torch.set_num_threads = set_threads
            torch.set_num_threads(thr)


def _layers(model) -> torch.nn.ModuleList:
    inner = getattr(model, "model", None) or getattr(model, "language_model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"cannot find the decoder layers of vLLM's {type(model).__name__}")
    return layers


def memory_kw() -> dict:
    """On a CPU, the share of memory vLLM may reserve (`gpu_memory_utilization`, which vLLM's CPU backend reads as
    a share of RAM): 80 % of what is free now, so a start-up beside other processes is not refused."""
    if torch.cuda.is_available():
        return {}
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        total, free = (int(info[k].split()[0]) for k in ("MemTotal", "MemAvailable"))
    except (OSError, KeyError, ValueError):
        return {}
    return {"gpu_memory_utilization": round(min(0.9, max(0.1, 0.8 * free / total)), 3)}


class VLLMEngine:
    """An in-process vLLM `LLM` as an Engine; `fallback` (an HFEngine) runs what vLLM cannot do exactly."""

    name = "vllm"
    seeds_per_prompt = True

    def __init__(self, model_path: str, tokenizer=None, fallback=None, dtype: str | torch.dtype = "auto",
                 max_model_len: int = 4096, steerable: bool = False, kv_cache_gb: int = 2,
                 max_num_seqs: int = 256, max_logprobs: int = 20):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(kv_cache_gb))))
        from vllm import LLM

        if isinstance(dtype, torch.dtype):
            dtype = str(dtype).removeprefix("torch.")
        self.model_path = model_path
        self.fallback = fallback
        self.steerable = steerable
        self.messages: list[str] = []
        with _keep_caller_state():
            self.llm = LLM(model=str(model_path), tokenizer=str(model_path), dtype=dtype, seed=0,
                           enable_prefix_caching=True, max_model_len=max_model_len, enforce_eager=steerable,
                           max_num_seqs=max_num_seqs, max_logprobs=max_logprobs, disable_log_stats=True,
                           # a prompt prefilled in chunks discards a sampled token and rewinds its seeded
                           # generator, which the CPU generator cannot do ("does not use offset")
                           enable_chunked_prefill=False, **memory_kw())
        self.tokenizer = tokenizer or self.llm.get_tokenizer()
        self.max_model_len = max_model_len
        self._stop_ids = self._eos_ids()

    def _eos_ids(self) -> list[int]:
        from transformers import GenerationConfig

        ids: set[int] = set()
        with contextlib.suppress(OSError, ValueError):
            eos = GenerationConfig.from_pretrained(self.model_path).eos_token_id
            ids.update([eos] if isinstance(eos, int) else list(eos or []))
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return sorted(ids)

    def _ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list | tuple):
            return list(prompt)
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def _run(self, token_lists: list[list[int]], params):
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in token_lists]
        with _keep_caller_state():
            return self.llm.generate(prompts, params, use_tqdm=False)

    def chunk_size(self, sampling) -> int:
        return 256

    # -- steering
    def can_steer(self, steering: Sequence[SteeringSpec]) -> str | None:
        """None when vLLM can apply these steering terms exactly, else the reason it cannot."""
        for s in steering:
            if s.positions not in STEERABLE_POSITIONS or s.mode != "add":
                return f"vLLM steers only constant additions at positions=all, not {s.mode} at {s.positions}"
        if steering and not self.steerable:
            return "this vLLM engine runs a compiled graph; start it with steerable=True to steer"
        return None

    @contextlib.contextmanager
    def steered(self, steering: Sequence[SteeringSpec]) -> Iterator[None]:
        """Hooks adding each `coef · vector` to the residual stream after block `layer` − 1, at every token."""
        if not steering:
            yield
            return
        reason = self.can_steer(steering)
        if reason:
            raise ValueError(reason)
        handles: list = []

        def attach(model):
            layers = _layers(model)
            for s in steering:
                v = (s.coef * s.vector.float()).to(next(model.parameters()).device)
                if s.layer == 0:
                    def pre(module, args, kwargs, v=v):
                        if len(args) >= 2:
                            return (args[0], (args[1].float() + v).to(args[1].dtype), *args[2:]), kwargs
                        h = kwargs["hidden_states"]
                        return args, {**kwargs, "hidden_states": (h.float() + v).to(h.dtype)}

                    handles.append(layers[0].register_forward_pre_hook(pre, with_kwargs=True))
                else:
                    def post(module, args, output, v=v):
                        h = output[0] if isinstance(output, tuple) else output
                        h = (h.float() + v).to(h.dtype)
                        return (h, *output[1:]) if isinstance(output, tuple) else h

                    handles.append(layers[s.layer - 1].register_forward_hook(post))

        self.llm.reset_prefix_cache()  # cached KV of unsteered prompts must not be reused
        self.llm.apply_model(attach)
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self.llm.reset_prefix_cache()

    # -- engine interface
    def generate(self, prompts: Sequence[str], sampling, seeds: Sequence[int] | None = None,
                 steering: Sequence[SteeringSpec] = ()) -> list[str]:
        """Answers from vLLM (one request per prompt with its own seed), or from the fallback where steering
        cannot be exact."""
        reason = self.can_steer(steering)
        if reason:
            if self.fallback is None:
                raise ValueError(reason)
            msg = f"{reason}; generating with the HF engine instead"
            self.messages.append(msg)
            warnings.warn(msg, stacklevel=2)
            return self.fallback.generate(prompts, sampling, seeds, steering)
        from vllm import SamplingParams

        greedy = sampling.temperature <= 0
        temp = 0.0 if greedy else sampling.temperature
        params = [SamplingParams(max_tokens=sampling.max_new_tokens, temperature=temp,
                                 top_p=1.0 if greedy else sampling.top_p, top_k=0,
                                 seed=None if seeds is None else int(seeds[i]) % (2**31),
                                 stop_token_ids=self._stop_ids, skip_special_tokens=True, detokenize=False)
                  for i in range(len(prompts))]
        with self.steered(steering):
            outs = self._run([self._ids(p) for p in prompts], params)
        return [self.tokenizer.decode(list(o.outputs[0].token_ids), skip_special_tokens=True).strip() for o in outs]

    def last_token_logprobs(self, prompts: Sequence[str | list[int]], top_k: int = 20) -> list[dict[int, float]]:
        """Top-k next-token log-probabilities (raw model logits, before any sampling transform)."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=top_k, detokenize=False)
        outs = self._run([self._ids(p) for p in prompts], params)
        res = []
        for o in outs:
            lp = o.outputs[0].logprobs[0]
            best = sorted(lp.items(), key=lambda kv: -kv[1].logprob)[:top_k]
            res.append({int(t): float(x.logprob) for t, x in best})
        return res

    def prompt_logprobs(self, prompts: Sequence[str], answers: Sequence[str]) -> list[list[float]]:
        """Per-token answer log-probabilities from vLLM's prompt logprobs (prompt and answer tokenised apart)."""
        from vllm import SamplingParams

        pairs = [(self._ids(p), self.tokenizer(a, add_special_tokens=False)["input_ids"])
                 for p, a in zip(prompts, answers, strict=True)]
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outs = self._run([p + a for p, a in pairs], params)
        res = []
        for (p, a), o in zip(pairs, outs, strict=True):
            plp = o.prompt_logprobs or []
            res.append([float(plp[len(p) + k][tok].logprob) for k, tok in enumerate(a)])
        return res
