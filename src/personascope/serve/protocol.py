"""The OpenAI-compatible protocol of `personascope serve`: errors, limits, validated requests and events.

`RequestParser` turns a JSON body into a `ChatRequest` (ApiError, 4xx, names the offending
parameter); the engine inherits it, since parsing needs the model's template and vectors.
"""

from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass, field

from personascope.model import ChatError, ModelAdapter, check_messages
from personascope.steering import GUARD_MODES, POSITIONS, GuardCalibration
from personascope.vectors import PersonaVector

from .wire import ApiError, integer_field, invalid, is_number, number_field

MAX_TOP_LOGPROBS = 20
MAX_STOP = 4
GREEDY_BELOW = 1e-4  # a temperature below this decodes greedily (dividing logits by ~0 overflows)
MAX_ALPHA = 10.0  # the largest |α| a steering entry may reach: |coef| · ‖v[l]‖ ≤ MAX_ALPHA · resid_norm[l]
MAX_RAW_COEF = 1e4  # the largest |coef| for a vector without resid_norm
MAX_STEERING = 16  # steering entries per request
SEED_RANGE = (-(2**63), 2**64 - 1)
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
VECTOR_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
NEUTRAL_PROMPTS = ("Hello! How are you today?", "What is the capital of France?",
                   "Can you explain how a bicycle works?", "Give me a tip for cooking rice.")


# ---------------------------------------------------------------- errors and config


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
    body_timeout_s: float = 30.0  # a request body not received within this gets 408
    drain_timeout_s: float = 10.0  # on shutdown, running requests get this long before they are ended (503)
    api_key: str | None = None
    host: str = "127.0.0.1"  # the bound address: a keyless loopback server accepts only loopback Host headers

    @property
    def guard_host(self) -> bool:
        """Whether requests must name a loopback Host (keyless on loopback: defeats DNS rebinding)."""
        return self.api_key is None and self.host in LOOPBACK_HOSTS


# ---------------------------------------------------------------- requests


@dataclass
class SteerItem:
    """One resolved steering entry of a request."""

    vector: str
    layer: int
    coef: float
    positions: str = "response"


@dataclass
class GuardItem:
    """A request's persona guard: `cap` clamps the projection into [lo, hi]; `conditional` adds `coef · v`
    (None: ablates v̂) while the projection is above `hi`."""

    vector: str
    layer: int
    mode: str
    lo: float | None
    hi: float | None
    coef: float | None = None
    positions: str = "response"

    def echo(self) -> dict:
        return {"vector": self.vector, "layer": self.layer, "mode": self.mode, "lo": self.lo, "hi": self.hi,
                "coef": self.coef, "positions": self.positions}


@dataclass
class MonitorSpec:
    vectors: list[str]
    layer: int
    layers: dict[str, int] = field(default_factory=dict)  # per-vector layers (the drift monitor's); others: layer

    def layer_of(self, name: str) -> int:
        return self.layers.get(name, self.layer)


@dataclass
class ChatRequest:
    """A validated chat completion request (a temperature below GREEDY_BELOW decodes greedily)."""

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
    guard: GuardItem | None = None


def text_of(content: object, param: str) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(f"{param}[{j}]: only text content parts are supported", f"{param}[{j}]")
            parts.append(part["text"])
        return "".join(parts)
    raise invalid(f"{param} must be a string or a list of text parts", param)


@dataclass
class Event:
    """What the worker tells a request: prompt projections, a token step, the end, or an error."""

    kind: str  # prompt | token | end | error
    choice: int = 0
    text: str = ""
    logprob: dict | None = None
    token: str | None = None
    projection: dict[str, float | None] | None = None
    finish_reason: str | None = None
    prompt: dict[str, float | None] | None = None
    prompt_tokens: int = 0
    error: ApiError | None = None
    guarded: bool | None = None  # the guard acted in the forward that chose this token


class RequestParser:
    """Validation of chat completion bodies against a model, its loaded vectors and the server's limits."""

    adapter: ModelAdapter
    vectors: dict[str, PersonaVector]
    config: ServeConfig
    model_id: str
    encoder: object  # a tokenizer of its own for prompts (parsing runs in threads beside the engine's decoding)
    encode_lock: threading.Lock

    def encode(self, prompt_text: str) -> list[int]:
        """Token ids of a rendered prompt, with the parser's own tokenizer (safe beside the engine's decoding)."""
        with self.encode_lock:
            return self.encoder(prompt_text, add_special_tokens=False)["input_ids"]  # type: ignore[operator]

    def render(self, messages: object) -> str:
        """The chat prompt text for OpenAI-style messages, validated like every chat row (`developer` = system)."""
        if not isinstance(messages, list) or not messages:
            raise invalid("'messages' must be a non-empty list of {role, content} objects", "messages")
        plain: list[object] = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise invalid(f"messages[{i}] must be an object", f"messages[{i}]")
            role = "system" if m.get("role") == "developer" else m.get("role")
            plain.append({"role": role, "content": text_of(m.get("content"), f"messages[{i}].content")})
        try:
            return self.adapter.render(check_messages(plain, answer=False))
        except ChatError as e:
            raise invalid(str(e), e.where or "messages") from None
        except Exception as e:  # a template that rejects this conversation (e.g. role order)
            raise invalid(f"the model's chat template rejected the messages: {e}", "messages") from None

    def _strength(self, pv: PersonaVector, name: str, key: str, value: object, layer: int, param: str) -> float:
        """A raw coefficient from a 'coef' or 'alpha' value, refused (400) beyond |α| ≤ MAX_ALPHA (|coef| ≤
        MAX_RAW_COEF for a vector without resid_norm)."""
        if not is_number(value) or abs(value) > MAX_RAW_COEF:  # type: ignore[arg-type]
            raise invalid(f"{param} must be a finite number (|x| ≤ {MAX_RAW_COEF:g}), got {value!r}", param,
                          "invalid_coefficient")
        coef = float(value)  # type: ignore[arg-type]
        if key == "alpha":
            if pv.resid_norm is None:
                raise invalid(f"{param}: vector {name!r} has no resid_norm, so 'alpha' cannot be converted; use 'coef'",
                              param)
            coef = pv.coef_from_alpha(coef, layer)
        alpha = pv.alpha_from_coef(coef, layer)
        if alpha is not None and not (math.isfinite(alpha) and math.isfinite(coef) and abs(alpha) <= MAX_ALPHA):
            raise invalid(f"{param} {value!r} is too strong at layer {layer}: it adds α = {alpha:.4g} times the "
                          f"residual norm; the limit is |α| ≤ {MAX_ALPHA:g}", param, "invalid_coefficient")
        return coef

    def _add_strength(self, totals: dict[tuple[int, bool], float], pv: PersonaVector, coef: float, layer: int,
                      param: str) -> None:
        """Count one entry's strength at its layer; refuse (400) when a layer's summed |α| passes MAX_ALPHA (summed
        |coef| passes MAX_RAW_COEF for vectors without resid_norm)."""
        alpha = pv.alpha_from_coef(coef, layer)
        key, amount, limit = ((layer, True), abs(alpha), MAX_ALPHA) if alpha is not None else \
            ((layer, False), abs(coef), MAX_RAW_COEF)
        totals[key] = totals.get(key, 0.0) + amount
        if totals[key] > limit * (1 + 1e-9):
            what = "α" if alpha is not None else "coef (vectors without resid_norm)"
            raise invalid(f"{param}: the steering at layer {layer} adds up to Σ|{what}| = {totals[key]:.4g}; the limit "
                          f"per layer is {limit:g}", param, "invalid_coefficient")

    def _layer(self, value: object, param: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise invalid(f"{param} must be an integer layer index, got {value!r}", param)
        if not 0 <= value <= self.adapter.n_layers:
            raise invalid(f"{param} {value} is out of range: {self.model_id} has layers 0..{self.adapter.n_layers}",
                       param, "layer_out_of_range")
        return value

    def _vector_name(self, value: object, param: str) -> str:
        if not isinstance(value, str) or value not in self.vectors:
            known = ", ".join(self.vectors) or "none (start the server with --vector NAME=FILE)"
            raise invalid(f"{param}: unknown vector {value!r}; loaded vectors: {known}", param, "unknown_vector")
        return value

    def _steering(self, raw: object, totals: dict[tuple[int, bool], float]) -> list[SteerItem]:
        if raw is None:
            return []
        if not isinstance(raw, list):
            raise invalid("'steering' must be a list of {vector, layer, coef} objects", "steering")
        if len(raw) > MAX_STEERING:
            raise invalid(f"'steering' has {len(raw)} entries; the limit is {MAX_STEERING}", "steering")
        items = []
        for i, s in enumerate(raw):
            p = f"steering[{i}]"
            if not isinstance(s, dict):
                raise invalid(f"{p} must be an object", p)
            unknown = set(s) - {"vector", "layer", "coef", "alpha", "positions"}
            if unknown:
                raise invalid(f"{p} has unknown field(s) {sorted(unknown)}", p)
            name = self._vector_name(s.get("vector"), f"{p}.vector")
            pv = self.vectors[name]
            layer = self._layer(s["layer"], f"{p}.layer") if "layer" in s else pv.default_layer()
            positions = s.get("positions", "response")
            if positions not in POSITIONS:
                raise invalid(f"{p}.positions must be one of {', '.join(POSITIONS)}, got {positions!r}",
                           f"{p}.positions")
            if ("coef" in s) == ("alpha" in s):
                raise invalid(f"{p} needs exactly one of 'coef' (raw) or 'alpha' (relative)", p)
            key = "coef" if "coef" in s else "alpha"
            coef = self._strength(pv, name, key, s[key], layer, f"{p}.{key}")
            self._add_strength(totals, pv, coef, layer, f"{p}.{key}")
            items.append(SteerItem(name, layer, coef, positions))
        return items

    def _number(self, raw: dict, key: str, param: str) -> float | None:
        value = raw.get(key)
        if value is None:
            return None
        if not is_number(value) or abs(value) > 1e6:  # type: ignore[arg-type]
            raise invalid(f"{param}.{key} must be a finite number (|x| ≤ 1e6), got {value!r}", f"{param}.{key}")
        return float(value)  # type: ignore[arg-type]

    def _guard_item(self, raw: object, totals: dict[tuple[int, bool], float]) -> GuardItem | None:
        if raw is None:
            return None
        p = "guard"
        if not isinstance(raw, dict):
            raise invalid("'guard' must be an object {vector, mode: cap|conditional, layer?}", p)
        unknown = set(raw) - {"vector", "layer", "mode", "lo", "hi", "threshold", "coef", "alpha", "positions"}
        if unknown:
            raise invalid(f"{p} has unknown field(s) {sorted(unknown)}", p)
        name = self._vector_name(raw.get("vector"), f"{p}.vector")
        pv = self.vectors[name]
        mode = raw.get("mode", "cap")
        if mode not in GUARD_MODES:
            raise invalid(f"{p}.mode must be one of {', '.join(GUARD_MODES)}, got {mode!r}", f"{p}.mode")
        positions = raw.get("positions", "response")
        if positions not in POSITIONS:
            raise invalid(f"{p}.positions must be one of {', '.join(POSITIONS)}, got {positions!r}",
                          f"{p}.positions")
        if "threshold" in raw and "hi" in raw:
            raise invalid(f"{p}: give 'hi' or its synonym 'threshold', not both", p)
        lo = self._number(raw, "lo", p)
        hi = self._number(raw, "threshold" if "threshold" in raw else "hi", p)
        cal = GuardCalibration.from_vector(pv)
        layer = self._layer(raw["layer"], f"{p}.layer") if "layer" in raw else \
            (cal.layer if cal is not None else pv.default_layer())
        if hi is None:
            if cal is None:
                raise invalid(f"{p}: vector {name!r} has no guard calibration; run `personascope guard calibrate` "
                              "on its file or give 'hi'", f"{p}.hi", "guard_not_calibrated")
            if cal.layer != layer:
                raise invalid(f"{p}: vector {name!r} is calibrated at layer {cal.layer}, not {layer}; give 'hi' "
                              "or use that layer", f"{p}.layer", "guard_not_calibrated")
            hi = cal.hi
        if lo is not None and lo > hi:
            raise invalid(f"{p}: lo {lo} is above hi {hi}", f"{p}.lo")
        if mode == "conditional" and lo is not None:
            raise invalid(f"{p}.lo applies to mode cap only", f"{p}.lo")
        coef = None
        if "coef" in raw or "alpha" in raw:
            if mode != "conditional":
                raise invalid(f"{p}: 'coef'/'alpha' apply to mode conditional only", p)
            if "coef" in raw and "alpha" in raw:
                raise invalid(f"{p} takes 'coef' (raw) or 'alpha' (relative), not both", p)
            key = "coef" if "coef" in raw else "alpha"
            if raw[key] is not None:
                coef = self._strength(pv, name, key, raw[key], layer, f"{p}.{key}")
                self._add_strength(totals, pv, coef, layer, f"{p}.{key}")
        return GuardItem(name, layer, mode, lo, hi, coef, positions)

    def _monitor(self, raw: object) -> MonitorSpec | None:
        if raw is None:
            return None
        if not isinstance(raw, dict):
            raise invalid("'monitor' must be an object {vectors: [NAME], layer: L}", "monitor")
        names = raw.get("vectors")
        if isinstance(names, str):
            names = [names]
        if not isinstance(names, list) or not names:
            raise invalid("monitor.vectors must be a non-empty list of vector names", "monitor.vectors")
        names = [self._vector_name(n, f"monitor.vectors[{i}]") for i, n in enumerate(names)]
        layer = self._layer(raw["layer"], "monitor.layer") if "layer" in raw else \
            self.vectors[names[0]].default_layer()
        return MonitorSpec(list(dict.fromkeys(names)), layer)

    def parse(self, body: object) -> ChatRequest:
        """Validate a chat completion body; ApiError (4xx) names the offending parameter."""
        if not isinstance(body, dict):
            raise invalid("the request body must be a JSON object", None, "invalid_json")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise invalid("'model' is required", "model", "missing_required_parameter")
        if model != self.model_id:
            raise ApiError(404, f"the model {model!r} does not exist here; this server serves {self.model_id!r}",
                           "model", "model_not_found")
        if "messages" not in body:
            raise invalid("'messages' is required", "messages", "missing_required_parameter")
        for key in ("tools", "functions", "tool_choice", "function_call", "logit_bias"):
            if body.get(key):
                raise invalid(f"'{key}' is not supported by this server", key, "unsupported_parameter")
        for key in ("frequency_penalty", "presence_penalty"):
            if body.get(key):
                raise invalid(f"'{key}' is not supported by this server (only 0)", key, "unsupported_parameter")
        rf = body.get("response_format")
        if rf and not (isinstance(rf, dict) and rf.get("type") == "text"):
            raise invalid("'response_format' other than text is not supported", "response_format",
                       "unsupported_parameter")
        cfg = self.config
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens: int | None = None
        if body.get(key) is not None:
            max_tokens = integer_field(body, key, 1, 1, cfg.max_tokens_limit)
        stop = body.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
            raise invalid(f"'stop' must be a non-empty string or a list of up to {MAX_STOP} of them", "stop")
        logprobs = body.get("logprobs") or False
        if not isinstance(logprobs, bool):
            raise invalid(f"'logprobs' must be a boolean, got {logprobs!r}", "logprobs")
        top = integer_field(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
        if top and not logprobs:
            raise invalid("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        stream = body.get("stream") or False
        if not isinstance(stream, bool):
            raise invalid(f"'stream' must be a boolean, got {stream!r}", "stream")
        opts = body.get("stream_options") or {}
        if not isinstance(opts, dict):
            raise invalid("'stream_options' must be an object", "stream_options")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                                 or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
            raise invalid(f"'seed' must be an integer from -2**63 to 2**64 - 1, got {seed!r}", "seed")
        temperature = number_field(body, "temperature", 1.0, 0.0, 2.0)
        top_p = number_field(body, "top_p", 1.0, 0.0, 1.0)
        n = integer_field(body, "n", 1, 1, min(cfg.max_n, cfg.max_batch))
        totals: dict[tuple[int, bool], float] = {}  # strength per layer: steering and guard together
        steering = self._steering(body.get("steering"), totals)
        guard = self._guard_item(body.get("guard"), totals)
        monitor = self._monitor(body.get("monitor"))
        prompt_ids = self.encode(self.render(body["messages"]))  # last: the one costly step
        context = self.adapter.context_length
        if max_tokens is None:  # the default answer length: what the context leaves, up to the server's default
            max_tokens = max(1, min(cfg.default_max_tokens, cfg.max_tokens_limit, context - len(prompt_ids)))
        limit = min(cfg.max_prompt_tokens, context - max_tokens)
        if len(prompt_ids) > limit:
            raise invalid(f"the prompt has {len(prompt_ids)} tokens; the limit is {limit} with max_tokens={max_tokens} "
                          f"(the model's context is {context})", "messages", "context_length_exceeded")
        return ChatRequest(
            model=model, prompt_ids=prompt_ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p, n=n,
            seed=seed, stop=stop, logprobs=logprobs, top_logprobs=top, stream=stream,
            include_usage=bool(opts.get("include_usage")), steering=steering, monitor=monitor, guard=guard,
        )

    # -- the worker
