"""An OpenAI-compatible chat server that steers and monitors with persona vectors, plus a dashboard.

`create_app(engine)` is a FastAPI app with `/v1/models`, `/v1/chat/completions` (non-streaming
and SSE streaming; temperature, top_p, max_tokens, seed, stop, n, logprobs/top_logprobs), the
extension `/v1/vectors`, `/health` and the dashboard at `/`. Two extension fields ride in the
request body (the openai SDK's `extra_body`):

- `steering: [{"vector": NAME, "layer": L, "coef": C | "alpha": A, "positions": "response"}]`
- `monitor: {"vectors": [NAME], "layer": L}`: the response gains the projection of the last
  prompt token on v̂ (`monitor.prompt`) and, per choice, one projection per answer token (the
  activation at the token's own position, the output of block L − 1). It is read before any
  steering at that same layer is added, so it shows the model's own state (which steering at
  lower layers, and the steered text so far, do move), not the vector just injected there.

`Engine` owns the model: one worker thread takes queued requests, groups up to `max_batch` rows
that arrive within `batch_wait_ms`, and runs them as one left-padded batch with its own decoding
loop (prefill, then one token at a time with the KV cache). Steering uses per-row coefficient
tensors, so rows of one batch carry different vectors and coefficients (0 where a row does not
use a vector) and no request sees another's steering. Finished rows leave the batch at once.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import queue
import re
import secrets
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from dataclasses import dataclass, field
from importlib import resources

import torch
from fastapi import Request

from .activations import collect_spans, project
from .adapter import (
    FALLBACK_TEMPLATE,
    ModelAdapter,
    block_output,
    cache_kwarg,
    output_cache,
    pad_batch,
    pad_id,
    position_ids_for,
)
from .steer import POSITIONS, Steerer
from .vectors import PersonaVector

TINY_PREFIX = "tiny-random-"  # hidden test models: random weights built from a config, no files
MAX_TOP_LOGPROBS = 20
MAX_STOP = 4
VECTOR_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
NEUTRAL_PROMPTS = ("Hello! How are you today?", "What is the capital of France?",
                   "Can you explain how a bicycle works?", "Give me a tip for cooking rice.")


# ---------------------------------------------------------------- errors and config


class ApiError(Exception):
    """An error answered with an OpenAI-style body: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ServeConfig:
    """Limits and batching knobs of the server (safe defaults)."""

    max_batch: int = 8
    batch_wait_ms: float = 5.0
    max_tokens_limit: int = 1024
    default_max_tokens: int = 256
    max_prompt_tokens: int = 8192
    max_body_bytes: int = 1_000_000
    max_queue: int = 256
    max_n: int = 8
    api_key: str | None = None


# ---------------------------------------------------------------- the hidden tiny test model


def tiny_random_model(name: str, seed: int = 0):
    """(model, tokenizer) of `tiny-random-<family>`: random weights, a byte-level tokenizer, ChatML.

    For tests and load tests only: it talks gibberish, fast. Built in code, nothing is downloaded.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    family = name.removeprefix(TINY_PREFIX)
    if family not in ("qwen2", "llama"):
        raise ValueError(f"unknown tiny test model {name!r}: use tiny-random-qwen2 or tiny-random-llama")
    # printable ASCII, tab and newline only (one token each), so its random answers are readable
    byte_char = _byte_chars()
    specials = ["<|im_start|>", "<|im_end|>", "<pad>", "<unk>"]
    vocab = {byte_char[b]: i for i, b in enumerate([9, 10, *range(32, 127)])}
    for s in specials:
        vocab[s] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<|im_end|>", unk_token="<unk>",
                                  additional_special_tokens=specials)
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(family, vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=4096, initializer_range=0.2, bos_token_id=vocab["<|im_start|>"],
                               eos_token_id=vocab["<|im_end|>"], pad_token_id=vocab["<pad>"])
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    model.config.name_or_path = name
    return model, tok


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte-level map: printable Latin-1 bytes stand for themselves, the others for 256 + k."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out = {b: chr(b) for b in keep}
    for k, b in enumerate(b for b in range(256) if b not in out):
        out[b] = chr(256 + k)
    return out


def load_serving_model(name: str, device: str | None = None, dtype: str | None = None) -> ModelAdapter:
    """The adapter of a built-in model, a local path, or a hidden `tiny-random-*` test model."""
    if name.startswith(TINY_PREFIX):
        model, tok = tiny_random_model(name)
        if device:
            model.to(device)
    else:
        from .models import load_model

        model, tok = load_model(name, device=device, dtype=dtype)
    return ModelAdapter(model, tok)


# ---------------------------------------------------------------- requests


@dataclass
class SteerItem:
    """One resolved steering entry of a request."""

    vector: str
    layer: int
    coef: float
    positions: str = "response"


@dataclass
class MonitorSpec:
    vectors: list[str]
    layer: int


@dataclass
class ChatRequest:
    """A validated chat completion request."""

    model: str
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    stream: bool = False
    include_usage: bool = False
    steering: list[SteerItem] = field(default_factory=list)
    monitor: MonitorSpec | None = None


def _bad(message: str, param: str | None, code: str = "invalid_value", status: int = 400) -> ApiError:
    return ApiError(status, message, param, code)


def _number(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad(f"'{key}' must be a number between {lo} and {hi}, got {value!r}", key)
    if not lo <= value <= hi:
        raise _bad(f"'{key}' must be between {lo} and {hi}, got {value}", key)
    return float(value)


def _integer(body: dict, key: str, default: int | None, lo: int, hi: int | None) -> int | None:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"'{key}' must be an integer, got {value!r}", key)
    if value < lo or (hi is not None and value > hi):
        raise _bad(f"'{key}' must be between {lo} and {hi}, got {value}" if hi is not None
                   else f"'{key}' must be at least {lo}, got {value}", key)
    return value


def _text_of(content: object, param: str) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"{param}[{j}]: only text content parts are supported", f"{param}[{j}]")
            parts.append(part["text"])
        return "".join(parts)
    raise _bad(f"{param} must be a string or a list of text parts", param)


class Engine:
    """Owns the model and the vectors; one worker thread batches and decodes queued requests."""

    def __init__(self, adapter: ModelAdapter, vectors: dict[str, PersonaVector] | None = None,
                 config: ServeConfig | None = None, model_id: str | None = None):
        self.adapter = adapter
        self.vectors = dict(vectors or {})
        for pv in self.vectors.values():
            pv.check(adapter)
        self.config = config or ServeConfig()
        self.model_id = model_id or adapter.name
        self.created = int(time.time())
        self.eos_ids = self._eos_ids()
        self.pad = pad_id(adapter.tokenizer)
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._carry: deque[Job] = deque()
        self._thread: threading.Thread | None = None
        self._token_text: dict[int, str] = {}
        self._lock = threading.Lock()
        self.tok_lock = threading.Lock()  # fast tokenizers may refuse use from two threads at once
        self.pending = 0
        self.stats = {"requests": 0, "batches": 0, "rows": 0, "max_batch_rows": 0, "tokens": 0, "errors": 0}
        self.baselines = self._baselines()

    # -- setup
    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for src in (self.adapter.tokenizer.eos_token_id,
                    getattr(getattr(self.adapter.model, "generation_config", None), "eos_token_id", None)):
            if isinstance(src, int):
                ids.add(src)
            elif isinstance(src, list | tuple):
                ids.update(int(x) for x in src)
        return ids

    @torch.no_grad()
    def _baselines(self) -> dict[str, list[float]]:
        """Per vector and layer: the mean projection of neutral prompts' last token (the meter's zero)."""
        if not self.vectors:
            return {}
        items = [(self.adapter.encode_prompt(self.adapter.prompt(p)), []) for p in NEUTRAL_PROMPTS]
        spans, _ = collect_spans(self.adapter, items, batch_size=len(items))
        last = spans["prompt_last"]  # [N, L + 1, d]
        return {name: [float(project(last[:, layer], pv.vector(layer)).mean()) for layer in range(pv.n_layers + 1)]
                for name, pv in self.vectors.items()}

    def vector_info(self) -> list[dict]:
        """What the dashboard needs to draw sliders and meters for each vector."""
        out = []
        for name, pv in self.vectors.items():
            norms = pv.vectors["response_avg"].norm(dim=-1)
            layer = pv.default_layer()
            out.append({
                "name": name, "trait": pv.trait, "default_layer": layer, "n_layers": pv.n_layers,
                "has_alpha": pv.resid_norm is not None,
                "coef_per_alpha": [pv.coef_from_alpha(1.0, la) for la in range(pv.n_layers + 1)]
                if pv.resid_norm is not None else None,
                "norm": [float(x) for x in norms], "baseline": self.baselines.get(name),
            })
        return out

    # -- request parsing
    def render(self, messages: object) -> str:
        """The chat prompt text for OpenAI-style messages (system merged into the first user turn if needed)."""
        if not isinstance(messages, list) or not messages:
            raise _bad("'messages' must be a non-empty list of {role, content} objects", "messages")
        msgs: list[dict] = []
        system: list[str] = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise _bad(f"messages[{i}] must be an object", f"messages[{i}]")
            role = m.get("role")
            if role not in ("system", "developer", "user", "assistant"):
                raise _bad(f"messages[{i}].role {role!r} is not supported (system, developer, user, assistant)",
                           f"messages[{i}].role")
            text = _text_of(m.get("content"), f"messages[{i}].content")
            if role in ("system", "developer"):
                role = "system"
            msgs.append({"role": role, "content": text})
            if role == "system":
                system.append(text)
        if not self.adapter.supports_system and system:
            rest = [m for m in msgs if m["role"] != "system"]
            first = next((m for m in rest if m["role"] == "user"), None)
            if first is None:
                raise _bad("a system message needs a user message after it", "messages")
            first["content"] = "\n\n".join(system) + "\n\n" + first["content"]
            msgs = rest
        tok = self.adapter.tokenizer
        template = getattr(tok, "chat_template", None) or FALLBACK_TEMPLATE
        try:
            return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, chat_template=template)
        except Exception as e:  # a template that rejects this conversation (e.g. role order)
            raise _bad(f"the model's chat template rejected the messages: {e}", "messages") from None

    def _layer(self, value: object, param: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(f"{param} must be an integer layer index, got {value!r}", param)
        if not 0 <= value <= self.adapter.n_layers:
            raise _bad(f"{param} {value} is out of range: {self.model_id} has layers 0..{self.adapter.n_layers}",
                       param, "layer_out_of_range")
        return value

    def _vector_name(self, value: object, param: str) -> str:
        if not isinstance(value, str) or value not in self.vectors:
            known = ", ".join(self.vectors) or "none (start the server with --vector NAME=FILE)"
            raise _bad(f"{param}: unknown vector {value!r}; loaded vectors: {known}", param, "unknown_vector")
        return value

    def _steering(self, raw: object) -> list[SteerItem]:
        if raw is None:
            return []
        if not isinstance(raw, list):
            raise _bad("'steering' must be a list of {vector, layer, coef} objects", "steering")
        items = []
        for i, s in enumerate(raw):
            p = f"steering[{i}]"
            if not isinstance(s, dict):
                raise _bad(f"{p} must be an object", p)
            unknown = set(s) - {"vector", "layer", "coef", "alpha", "positions"}
            if unknown:
                raise _bad(f"{p} has unknown field(s) {sorted(unknown)}", p)
            name = self._vector_name(s.get("vector"), f"{p}.vector")
            pv = self.vectors[name]
            layer = self._layer(s["layer"], f"{p}.layer") if "layer" in s else pv.default_layer()
            positions = s.get("positions", "response")
            if positions not in POSITIONS:
                raise _bad(f"{p}.positions must be one of {', '.join(POSITIONS)}, got {positions!r}",
                           f"{p}.positions")
            if ("coef" in s) == ("alpha" in s):
                raise _bad(f"{p} needs exactly one of 'coef' (raw) or 'alpha' (relative)", p)
            key = "coef" if "coef" in s else "alpha"
            value = s[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                    or abs(value) > 1e4:
                raise _bad(f"{p}.{key} must be a finite number (|x| ≤ 10000), got {value!r}", f"{p}.{key}",
                           "invalid_coefficient")
            if key == "alpha":
                if pv.resid_norm is None:
                    raise _bad(f"{p}: vector {name!r} has no resid_norm, so 'alpha' cannot be converted; use 'coef'",
                               f"{p}.alpha")
                value = pv.coef_from_alpha(float(value), layer)
            items.append(SteerItem(name, layer, float(value), positions))
        return items

    def _monitor(self, raw: object) -> MonitorSpec | None:
        if raw is None:
            return None
        if not isinstance(raw, dict):
            raise _bad("'monitor' must be an object {vectors: [NAME], layer: L}", "monitor")
        names = raw.get("vectors")
        if isinstance(names, str):
            names = [names]
        if not isinstance(names, list) or not names:
            raise _bad("monitor.vectors must be a non-empty list of vector names", "monitor.vectors")
        names = [self._vector_name(n, f"monitor.vectors[{i}]") for i, n in enumerate(names)]
        layer = self._layer(raw["layer"], "monitor.layer") if "layer" in raw else \
            self.vectors[names[0]].default_layer()
        return MonitorSpec(list(dict.fromkeys(names)), layer)

    def parse(self, body: object) -> ChatRequest:
        """Validate a chat completion body; ApiError (4xx) names the offending parameter."""
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object", None, "invalid_json")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _bad("'model' is required", "model", "missing_required_parameter")
        if model != self.model_id:
            raise ApiError(404, f"the model {model!r} does not exist here; this server serves {self.model_id!r}",
                           "model", "model_not_found")
        if "messages" not in body:
            raise _bad("'messages' is required", "messages", "missing_required_parameter")
        for key in ("tools", "functions", "tool_choice", "function_call", "logit_bias"):
            if body.get(key):
                raise _bad(f"'{key}' is not supported by this server", key, "unsupported_parameter")
        for key in ("frequency_penalty", "presence_penalty"):
            if body.get(key):
                raise _bad(f"'{key}' is not supported by this server (only 0)", key, "unsupported_parameter")
        rf = body.get("response_format")
        if rf and not (isinstance(rf, dict) and rf.get("type") == "text"):
            raise _bad("'response_format' other than text is not supported", "response_format",
                       "unsupported_parameter")
        cfg = self.config
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _integer(body, key, min(cfg.default_max_tokens, cfg.max_tokens_limit), 1, cfg.max_tokens_limit)
        stop = body.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
            raise _bad(f"'stop' must be a non-empty string or a list of up to {MAX_STOP} of them", "stop")
        logprobs = body.get("logprobs") or False
        if not isinstance(logprobs, bool):
            raise _bad(f"'logprobs' must be a boolean, got {logprobs!r}", "logprobs")
        top = _integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
        if top and not logprobs:
            raise _bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        stream = body.get("stream") or False
        if not isinstance(stream, bool):
            raise _bad(f"'stream' must be a boolean, got {stream!r}", "stream")
        opts = body.get("stream_options") or {}
        if not isinstance(opts, dict):
            raise _bad("'stream_options' must be an object", "stream_options")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise _bad(f"'seed' must be an integer, got {seed!r}", "seed")
        with self.tok_lock:
            prompt_ids = self.adapter.encode_prompt(self.render(body["messages"]))
        limit = min(cfg.max_prompt_tokens, self._context_length() - max_tokens)
        if len(prompt_ids) > limit:
            raise _bad(f"the prompt has {len(prompt_ids)} tokens; the limit is {limit} with max_tokens={max_tokens}",
                       "messages", "context_length_exceeded")
        return ChatRequest(
            model=model, prompt_ids=prompt_ids, max_tokens=max_tokens,
            temperature=_number(body, "temperature", 1.0, 0.0, 2.0), top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
            n=_integer(body, "n", 1, 1, min(cfg.max_n, cfg.max_batch)), seed=seed, stop=stop, logprobs=logprobs,
            top_logprobs=top, stream=stream, include_usage=bool(opts.get("include_usage")),
            steering=self._steering(body.get("steering")), monitor=self._monitor(body.get("monitor")),
        )

    def _context_length(self) -> int:
        cfg = self.adapter.model.config
        cfg = getattr(cfg, "text_config", None) or cfg
        return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 32768)

    # -- the worker
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="personascope-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, job: Job) -> None:
        with self._lock:
            if self.pending >= self.config.max_queue:
                raise ApiError(429, f"the server is busy ({self.pending} requests queued); retry shortly", None,
                               "server_busy", "rate_limit_error")
            self.pending += 1
            self.stats["requests"] += 1
        self._queue.put(job)

    def _next_batch(self) -> list[Job] | None:
        """Block for one job, then gather more that arrive within the batching window (up to max_batch rows)."""
        job = self._carry.popleft() if self._carry else self._queue.get()
        if job is None:
            return None
        batch, rows = [job], job.request.n
        deadline = time.monotonic() + self.config.batch_wait_ms / 1000
        while rows < self.config.max_batch:
            try:
                nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if nxt is None:
                self._queue.put(None)
                break
            if rows + nxt.request.n > self.config.max_batch:
                self._carry.append(nxt)
                break
            batch.append(nxt)
            rows += nxt.request.n
        return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            live = [j for j in batch if not j.cancelled]
            try:
                if live:
                    self._generate(live)
            except Exception as e:  # keep serving: fail this batch's requests, not the server
                self.stats["errors"] += 1
                traceback.print_exc(file=sys.stderr)
                for j in live:
                    j.emit(Event("error", error=ApiError(500, f"generation failed: {type(e).__name__}: {e}", None,
                                                         "generation_error", "server_error")))
            finally:
                with self._lock:
                    self.pending -= len(batch)
                for j in batch:
                    if j.cancelled and j not in live:
                        j.emit(Event("end"))

    # -- decoding
    def decode(self, ids: list[int]) -> str:
        with self.tok_lock:
            return self.adapter.tokenizer.decode(ids, skip_special_tokens=True)

    def token_text(self, tid: int) -> str:
        """A token's own text (special tokens included), for logprobs."""
        text = self._token_text.get(tid)
        if text is None:
            with self.tok_lock:
                text = self.adapter.tokenizer.decode([tid])
            self._token_text[tid] = text
        return text

    def _logprob_entry(self, tid: int, logp: float) -> dict:
        text = self.token_text(tid)
        return {"token": text, "logprob": max(logp, -9999.0), "bytes": list(text.encode("utf-8"))}

    def _steerer(self, rows: list[Row]) -> Steerer | None:
        coefs: dict[tuple[str, int, str], torch.Tensor] = {}
        for i, r in enumerate(rows):
            for s in r.job.request.steering:
                key = (s.vector, s.layer, s.positions)
                coefs.setdefault(key, torch.zeros(len(rows)))[i] += s.coef
        if not coefs:
            return None
        st = Steerer(self.adapter)
        for (name, layer, positions), coef in coefs.items():
            st.add(self.vectors[name].vector(layer), layer, coef, positions)
        return st

    def _capture(self, layers: set[int], store: dict[int, torch.Tensor]) -> list:
        """Hooks recording the last position of each forward at each monitored layer (before steering there)."""
        handles = []
        for layer in layers:
            if layer == 0:
                def pre(module, args, kwargs, layer=layer):
                    h = args[0] if args else kwargs["hidden_states"]
                    store[layer] = h[:, -1].detach().float()

                handles.append(self.adapter.blocks[0].register_forward_pre_hook(pre, with_kwargs=True))
            else:
                def post(module, args, output, layer=layer):
                    store[layer] = block_output(output)[:, -1].detach().float()

                handles.append(self.adapter.blocks[layer - 1].register_forward_hook(post))
        return handles

    def _projections(self, rows: list[Row], store: dict[int, torch.Tensor]) -> list[dict[str, float] | None]:
        out: list[dict[str, float] | None] = [None] * len(rows)
        cache: dict[tuple[int, str], torch.Tensor] = {}
        for i, r in enumerate(rows):
            mon = r.job.request.monitor
            if mon is None:
                continue
            vals = {}
            for name in mon.vectors:
                key = (mon.layer, name)
                if key not in cache:
                    cache[key] = project(store[mon.layer], self.vectors[name].vector(mon.layer)).cpu()
                vals[name] = float(cache[key][i])
            out[i] = vals
        return out

    def _sample(self, logits: torch.Tensor, rows: list[Row]) -> tuple[list[int], torch.Tensor | None]:
        logp = torch.log_softmax(logits, dim=-1) if any(r.job.request.logprobs for r in rows) else None
        toks = logits.argmax(-1).tolist()
        for i, r in enumerate(rows):
            req = r.job.request
            if req.temperature <= 0:
                continue
            probs = torch.softmax(logits[i] / req.temperature, dim=-1)
            if req.top_p < 1.0:
                sp, si = probs.sort(descending=True)
                cut = (sp.cumsum(-1) - sp) > req.top_p
                sp[cut] = 0.0
                probs = torch.zeros_like(probs).scatter_(0, si, sp)
            toks[i] = int(torch.multinomial(probs, 1, generator=r.generator))
        return toks, logp

    @torch.no_grad()
    def _generate(self, jobs: list[Job]) -> None:
        dev = self.adapter.device
        rows = [Row(self, j, c) for j in jobs for c in range(j.request.n)]
        self.stats["batches"] += 1
        self.stats["rows"] += len(rows)
        self.stats["max_batch_rows"] = max(self.stats["max_batch_rows"], len(rows))
        ids, mask = pad_batch([r.job.request.prompt_ids for r in rows], self.pad, "left")
        ids, mask = ids.to(dev), mask.to(dev)
        steerer = self._steerer(rows)
        store: dict[int, torch.Tensor] = {}
        monitored = {r.job.request.monitor.layer for r in rows if r.job.request.monitor}
        handles = self._capture(monitored, store)  # registered before the steering hooks: sees unsteered output
        try:
            if steerer is not None:
                steerer.attach()
            out = self.adapter.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_for(mask),
                                     use_cache=True, logits_to_keep=1)
            cache, logits = output_cache(out), out.logits[:, -1].float()
            prompt_proj = self._projections(rows, store)
            for i, r in enumerate(rows):
                if r.choice == 0:
                    r.job.emit(Event("prompt", prompt=prompt_proj[i], prompt_tokens=len(r.job.request.prompt_ids)))
            while rows:
                toks, logp = self._sample(logits, rows)
                entries = self._entries(toks, logp, rows)
                for r, t, e in zip(rows, toks, entries, strict=True):
                    r.accept(t, e)
                self.stats["tokens"] += len(rows)
                # a monitored token's event waits for the forward that sees it (its projection); others go now
                watch = any(r.job.request.monitor for r in rows)
                if not watch:
                    for r in rows:
                        r.flush(None)
                if watch or any(not r.finished for r in rows):
                    mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype, device=dev)], dim=1)
                    out = self.adapter.model(input_ids=torch.tensor(toks, device=dev)[:, None], attention_mask=mask,
                                             position_ids=position_ids_for(mask)[:, -1:], use_cache=True,
                                             **{cache_kwarg(self.adapter.model): cache})
                    cache, logits = output_cache(out), out.logits[:, -1].float()
                if watch:
                    for r, p in zip(rows, self._projections(rows, store), strict=True):
                        r.flush(p)
                keep = [i for i, r in enumerate(rows) if not r.finished and not r.job.cancelled]
                if len(keep) < len(rows):
                    if keep:
                        sel = torch.tensor(keep, device=dev)
                        cache.batch_select_indices(sel)
                        mask, logits = mask[sel], logits[sel]
                        for spec in steerer.specs if steerer else []:
                            spec.coef = spec.coef[sel.cpu()]
                    rows = [rows[i] for i in keep]
        finally:
            for h in handles:
                h.remove()
            if steerer is not None:
                steerer.remove()

    def _entries(self, toks: list[int], logp: torch.Tensor | None, rows: list[Row]) -> list[dict | None]:
        if logp is None:
            return [None] * len(rows)
        out: list[dict | None] = []
        k = max((r.job.request.top_logprobs for r in rows if r.job.request.logprobs), default=0)
        top = logp.topk(k, dim=-1) if k else None
        for i, (r, t) in enumerate(zip(rows, toks, strict=True)):
            req = r.job.request
            if not req.logprobs:
                out.append(None)
                continue
            e = self._logprob_entry(t, float(logp[i, t]))
            e["top_logprobs"] = [self._logprob_entry(int(tid), float(lp)) for lp, tid in
                                 zip(top.values[i, : req.top_logprobs].tolist(),
                                     top.indices[i, : req.top_logprobs].tolist(), strict=True)] if top else []
            out.append(e)
        return out


@dataclass
class Event:
    """What the worker tells a request: prompt projections, a token step, the end, or an error."""

    kind: str  # prompt | token | end | error
    choice: int = 0
    text: str = ""
    logprob: dict | None = None
    token: str | None = None
    projection: dict[str, float] | None = None
    finish_reason: str | None = None
    prompt: dict[str, float] | None = None
    prompt_tokens: int = 0
    error: ApiError | None = None


class Job:
    """One HTTP request in the engine: events go to an asyncio queue on the server's loop."""

    def __init__(self, request: ChatRequest, loop: asyncio.AbstractEventLoop | None = None):
        self.request = request
        self.loop = loop
        self.events: asyncio.Queue[Event] | queue.Queue[Event] = asyncio.Queue() if loop else queue.Queue()
        self.cancelled = False
        self.finished_rows = 0

    def emit(self, event: Event) -> None:
        if self.loop is None:
            self.events.put_nowait(event)
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is gone (server shutting down)
            self.cancelled = True


class Row:
    """One sequence of a batch (one choice of one request): text, stop strings, finish reason."""

    def __init__(self, engine: Engine, job: Job, choice: int):
        self.engine, self.job, self.choice = engine, job, choice
        req = job.request
        seed = req.seed + choice if req.seed is not None else secrets.randbits(62)
        self.generator = torch.Generator(device=engine.adapter.device).manual_seed(seed % (2**63))
        self.ids: list[int] = []
        self.text = ""  # decoded answer so far (complete characters only, until the row finishes)
        self._offsets = (0, 0)  # incremental detokenisation: (context start, end of decoded ids)
        self.emitted = 0
        self.finished = False
        self.reason: str | None = None
        self._pending: tuple[str, dict | None, str | None] | None = None
        self._maxstop = max((len(s) for s in req.stop), default=0)

    def _detokenize(self, force: bool = False) -> None:
        """Extend `text` with the new tokens, decoded with a little context; wait out split UTF-8 characters."""
        start, read = self._offsets
        before = self.engine.decode(self.ids[start:read])
        after = self.engine.decode(self.ids[start:])
        if len(after) > len(before) and (force or not after.endswith("\ufffd")):
            self.text += after[len(before):]
            self._offsets = (read, len(self.ids))

    def accept(self, tid: int, entry: dict | None) -> None:
        """Take one sampled token; work out the text it releases and whether the row is done."""
        req = self.job.request
        eos = tid in self.engine.eos_ids
        if not eos:
            self.ids.append(tid)
        count = len(self.ids) + (1 if eos else 0)
        self._detokenize(force=eos or count >= req.max_tokens)
        text = self.text
        end = len(text)
        if req.stop:
            hits = [i for i in (text.find(s, max(0, self.emitted - self._maxstop)) for s in req.stop) if i >= 0]
            if hits:
                end, self.finished, self.reason = min(hits), True, "stop"
        if not self.finished:
            if eos:
                self.finished, self.reason = True, "stop"
            elif count >= req.max_tokens:
                self.finished, self.reason = True, "length"
            else:
                end = self._safe_end(text)
        delta = text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        # the monitor's token text is the piece of content this token released, so pieces join to the content
        self._pending = (delta, entry, delta if not eos or delta else None)

    def _safe_end(self, text: str) -> int:
        """How much text can be released: hold back a tail that may start a stop string."""
        end = len(text)
        for k in range(min(self._maxstop - 1, end - self.emitted), 0, -1):
            if any(s.startswith(text[end - k :]) for s in self.job.request.stop):
                return end - k
        return end

    def flush(self, projection: dict[str, float] | None) -> None:
        """Send this step's event (after the forward that saw the token, so its projection is known)."""
        if self._pending is None or self.job.cancelled:
            return
        delta, entry, token = self._pending
        self._pending = None
        self.job.emit(Event("token", self.choice, delta, entry, token, projection if token is not None else None,
                            self.reason if self.finished else None))
        if self.finished:
            self.job.finished_rows += 1
            if self.job.finished_rows == self.job.request.n:
                self.job.emit(Event("end"))


# ---------------------------------------------------------------- responses


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _monitor_head(engine: Engine, req: ChatRequest, prompt: dict[str, float] | None) -> dict | None:
    if req.monitor is None:
        return None
    layer = req.monitor.layer
    scale = {n: {"baseline": engine.baselines[n][layer],
                 "norm": float(engine.vectors[n].vector(layer).norm())} for n in req.monitor.vectors}
    return {"layer": layer, "vectors": req.monitor.vectors, "prompt": prompt, "scale": scale}


def _steering_echo(req: ChatRequest) -> list[dict] | None:
    if not req.steering:
        return None
    return [{"vector": s.vector, "layer": s.layer, "coef": s.coef, "positions": s.positions} for s in req.steering]


async def complete(engine: Engine, req: ChatRequest, job: Job, rid: str) -> dict:
    """Collect a whole (non-streaming) completion."""
    choices = [{"index": c, "text": [], "logprobs": [], "tokens": [], "proj": [], "finish": None}
               for c in range(req.n)]
    prompt, prompt_tokens, completion_tokens = None, 0, 0
    while True:
        ev = await job.events.get()
        if ev.kind == "error":
            raise ev.error
        if ev.kind == "end":
            break
        if ev.kind == "prompt":
            prompt, prompt_tokens = ev.prompt, ev.prompt_tokens
            continue
        ch = choices[ev.choice]
        completion_tokens += 1
        ch["text"].append(ev.text)
        if ev.logprob is not None:
            ch["logprobs"].append(ev.logprob)
        if ev.token is not None and req.monitor:
            ch["tokens"].append(ev.token)
            ch["proj"].append(ev.projection)
        if ev.finish_reason:
            ch["finish"] = ev.finish_reason
    out_choices = []
    for c, ch in enumerate(choices):
        item: dict = {"index": c, "message": {"role": "assistant", "content": "".join(ch["text"])},
                      "finish_reason": ch["finish"] or "stop",
                      "logprobs": {"content": ch["logprobs"], "refusal": None} if req.logprobs else None}
        if req.monitor:
            item["monitor"] = {"tokens": ch["tokens"],
                               "projections": {n: [p[n] for p in ch["proj"]] for n in req.monitor.vectors}}
        out_choices.append(item)
    resp = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": engine.model_id,
            "choices": out_choices, "usage": _usage(prompt_tokens, completion_tokens)}
    if req.monitor:
        resp["monitor"] = _monitor_head(engine, req, prompt)
    if req.steering:
        resp["steering"] = _steering_echo(req)
    return resp


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


async def stream(engine: Engine, req: ChatRequest, job: Job, rid: str):
    """Yield SSE lines: a role chunk per choice, one chunk per token step, usage if asked, then [DONE]."""
    created = int(time.time())
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": engine.model_id}
    completion_tokens, prompt_tokens = 0, 0
    try:
        while True:
            ev = await job.events.get()
            if ev.kind == "error":
                yield _sse(ev.error.body())
                return
            if ev.kind == "end":
                break
            if ev.kind == "prompt":
                prompt_tokens = ev.prompt_tokens
                for c in range(req.n):
                    chunk = {**base, "choices": [{"index": c, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}]}
                    if c == 0 and req.monitor:
                        chunk["monitor"] = _monitor_head(engine, req, ev.prompt)
                    if c == 0 and req.steering:
                        chunk["steering"] = _steering_echo(req)
                    yield _sse(chunk)
                continue
            completion_tokens += 1
            choice: dict = {"index": ev.choice, "delta": {"content": ev.text} if ev.text else {},
                            "logprobs": {"content": [ev.logprob], "refusal": None} if ev.logprob else None,
                            "finish_reason": ev.finish_reason}
            if req.monitor and ev.token is not None:
                choice["monitor"] = {"tokens": [ev.token],
                                     "projections": {n: [ev.projection[n]] for n in req.monitor.vectors}}
            yield _sse({**base, "choices": [choice]})
        if req.include_usage:
            yield _sse({**base, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
        yield _sse("[DONE]")
    finally:
        job.cancelled = True  # a client that went away stops its rows at the next step


# ---------------------------------------------------------------- the app


def _dashboard_html() -> str:
    return (resources.files("personascope") / "static" / "dashboard.html").read_text(encoding="utf-8")


def create_app(engine: Engine):
    """The FastAPI app around an engine (the engine's worker starts and stops with the app)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    cfg = engine.config

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="personascope", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        return JSONResponse(ApiError(exc.status_code, str(exc.detail), None, None).body(),
                            status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        return JSONResponse(ApiError(400, str(exc.errors()[:1]), None, None).body(), status_code=400)

    @app.exception_handler(Exception)
    async def server_error(request, exc: Exception):
        traceback.print_exception(exc, file=sys.stderr)
        return JSONResponse(ApiError(500, f"internal error: {type(exc).__name__}", None, None, "server_error")
                            .body(), status_code=500)

    def authorize(request: Request) -> None:
        if cfg.api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), cfg.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", None,
                           "invalid_api_key")

    async def read_json(request: Request) -> object:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > cfg.max_body_bytes:
            raise ApiError(413, f"the request body is {length} bytes; the limit is {cfg.max_body_bytes}", None,
                           "request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cfg.max_body_bytes:
                raise ApiError(413, f"the request body exceeds the limit of {cfg.max_body_bytes} bytes", None,
                               "request_too_large")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _bad(f"the request body is not valid JSON: {e}", None, "invalid_json") from None

    @app.get("/", response_class=HTMLResponse)
    async def dashboard():
        return HTMLResponse(_dashboard_html())

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.model_id, "auth": cfg.api_key is not None,
                "pending": engine.pending, **engine.stats}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": engine.model_id, "object": "model", "created": engine.created,
                                            "owned_by": "personascope"}]}

    @app.get("/v1/models/{model_id:path}")
    async def model_info(model_id: str, request: Request):
        authorize(request)
        if model_id != engine.model_id:
            raise ApiError(404, f"the model {model_id!r} does not exist here", "model", "model_not_found")
        return {"id": engine.model_id, "object": "model", "created": engine.created, "owned_by": "personascope"}

    @app.get("/v1/vectors")
    async def vectors(request: Request):
        authorize(request)
        return {"model": engine.model_id, "n_layers": engine.adapter.n_layers, "vectors": engine.vector_info()}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        authorize(request)
        req = engine.parse(await read_json(request))
        job = Job(req, asyncio.get_running_loop())
        engine.submit(job)
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if req.stream:
            return StreamingResponse(stream(engine, req, job, rid), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            return JSONResponse(await complete(engine, req, job, rid))
        finally:
            job.cancelled = True

    return app


def run_server(engine: Engine, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(engine), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
