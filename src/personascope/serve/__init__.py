"""An OpenAI-compatible chat server that steers and monitors with persona vectors, plus a dashboard.

`create_app(engine)` is a FastAPI app with `/v1/models`, `/v1/chat/completions` (non-streaming
and SSE streaming; temperature, top_p, max_tokens, seed, stop, n, logprobs/top_logprobs), the
extension `/v1/vectors`, `/health` and the dashboard at `/`. Two extension fields ride in the
request body (the openai SDK's `extra_body`):

- `steering: [{"vector": NAME, "layer": L, "coef": C | "alpha": A, "positions": "response"}]`
- `guard: {"vector": NAME, "mode": "cap" | "conditional", "layer": L, "hi": X, "lo": X, "coef": C}`: a
  persona guard (layer and thresholds default to the vector's `personascope guard calibrate` range; a
  conditional guard without coef/alpha ablates v̂ while the projection is above hi). Each choice reports
  `guard.touched` (tokens chosen while the guard acted) and `guard.fired` (one flag per token).
- `monitor: {"vectors": [NAME], "layer": L}`: the response gains the projection of the last
  prompt token on v̂ (`monitor.prompt`) and, per choice, one projection per answer token (the
  activation at the token's own position, the output of block L − 1). It is read before any
  steering at that same layer is added, so it shows the model's own state (which steering at
  lower layers, and the steered text so far, do move), not the vector just injected there.

Limits: at most 16 steering entries, and at each layer the steering's and the guard's summed strength
Σ|α| ≤ 10 (Σ|coef| ≤ 1e4 for vectors without resid_norm); bodies are strict UTF-8 JSON (no BOM, no NaN,
no lone surrogates, integers of at most 30 digits), received within `body_timeout_s` (else 408); without
max_tokens an answer gets what the context leaves, up to `default_max_tokens`. On SIGTERM the server drains:
open requests get `drain_timeout_s`, then end with a 503 (a JSON error, or an SSE error event and [DONE]).
`/health` answers 503 once the engine's worker is gone or the server drains.

`Engine` owns the model: one worker thread takes queued requests, groups up to `max_batch` rows
that arrive within `batch_wait_ms`, and runs them as one left-padded batch with its own decoding
loop (prefill, then one token at a time with the KV cache). Steering uses per-row coefficient
tensors, so rows of one batch carry different vectors and coefficients (0 where a row does not
use a vector) and no request sees another's steering. Finished rows leave the batch at once.
"""


from .app import complete, create_app, run_server, stream
from .drift_service import DriftService
from .drift_store import DriftStore, StoreError, TurnRecord
from .engine import Engine
from .jobs import Job, Row
from .lifecycle import bind_socket
from .loading import TINY_PREFIX, load_serving_model, tiny_random_model
from .metrics import Metrics
from .protocol import (
    MAX_STEERING,
    MAX_STOP,
    MAX_TOP_LOGPROBS,
    VECTOR_NAME,
    ApiError,
    ChatRequest,
    Event,
    GuardItem,
    MonitorSpec,
    RequestParser,
    ServeConfig,
    SteerItem,
)
from .wire import OPTION_RANGES, decode_body, option_problem

__all__ = [
    "ApiError", "ChatRequest", "DriftService", "DriftStore", "Engine", "Event", "GuardItem", "Job", "MAX_STEERING",
    "MAX_STOP", "MAX_TOP_LOGPROBS", "Metrics", "MonitorSpec", "OPTION_RANGES", "RequestParser", "Row", "ServeConfig",
    "SteerItem", "StoreError", "TINY_PREFIX", "TurnRecord", "VECTOR_NAME", "bind_socket", "complete", "create_app",
    "decode_body", "load_serving_model", "option_problem", "run_server",
    "stream", "tiny_random_model",
]
