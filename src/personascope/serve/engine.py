"""The serving engine: one worker thread batches queued requests and decodes them with per-row steering.

Rows that arrive within `batch_wait_ms` run as one left-padded batch with the engine's own
decoding loop (prefill, then one token at a time with the KV cache). Steering uses per-row
coefficient tensors, so no request sees another's steering; finished rows leave the batch at once.
A row whose logits turn non-finite fails alone (its request gets an error); the others go on.

Determinism: in fp32 a greedy answer does not depend on which other requests share its batch. In
bf16/fp16 near-tied logits can flip with the batch's make-up (padding changes the kernels' sums);
serve with `--dtype fp32` or `--max-batch 1` when answers must be reproducible.
"""

from __future__ import annotations

import copy
import logging
import math
import queue
import threading
import time
from collections import deque

import torch

from personascope.model import (
    ModelAdapter,
    ResidualHooks,
    cache_kwarg,
    last_token_activations,
    output_cache,
    pad_batch,
    pad_id,
    position_ids_for,
    project,
)
from personascope.steering import Guard, GuardCalibration, Steerer
from personascope.vectors import PersonaVector

from .jobs import Job, Row
from .protocol import GREEDY_BELOW, NEUTRAL_PROMPTS, ApiError, Event, RequestParser, ServeConfig

log = logging.getLogger(__name__)

NON_FINITE = ("the model's output became non-finite (inf/NaN) for this request, usually from too strong steering; "
              "lower the coefficient")


def finite(x: float) -> float | None:
    """A float for JSON: None stands for NaN or inf (which JSON cannot carry)."""
    x = float(x)
    return x if math.isfinite(x) else None


class Engine(RequestParser):
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
        self.encoder = copy.deepcopy(adapter.tokenizer)  # prompts are tokenised in threads beside the decoding
        self.encode_lock = threading.Lock()
        self.pending = 0
        self.failure: str | None = None  # why the worker thread stopped, when it did
        self._gathering: list[Job] = []  # the jobs the worker has taken from the queue and not yet finished
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
    def _baselines(self) -> dict[str, list[float | None]]:
        """Per vector and layer: the mean projection of neutral prompts' last token (the meter's zero)."""
        if not self.vectors:
            return {}
        prompts = [self.adapter.prompt(p) for p in NEUTRAL_PROMPTS]
        last = last_token_activations(self.adapter, prompts, batch_size=len(prompts))  # [N, L + 1, d]
        return {name: [finite(project(last[:, layer], pv.vector(layer)).mean()) for layer in range(pv.n_layers + 1)]
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
                "coef_per_alpha": [finite(pv.coef_from_alpha(1.0, la)) for la in range(pv.n_layers + 1)]
                if pv.resid_norm is not None else None,
                "norm": [finite(x) for x in norms], "baseline": self.baselines.get(name),
                "guard": {"layer": cal.layer, "lo": cal.lo, "hi": cal.hi, "percentile": cal.percentile}
                if (cal := GuardCalibration.from_vector(pv)) is not None else None,
            })
        return out

    # -- request parsing

    @property
    def alive(self) -> bool:
        """Whether the worker thread is running (and so queued requests will be answered)."""
        return self._thread is not None and self._thread.is_alive() and self.failure is None

    def start(self) -> None:
        if self._thread is None:
            self.failure = None
            self._thread = threading.Thread(target=self._run, name="personascope-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, job: Job) -> None:
        with self._lock:
            if self.failure is not None:
                raise self._stopped_error()
            if self.pending >= self.config.max_queue:
                raise ApiError(429, f"the server is busy ({self.pending} requests queued); retry shortly", None,
                               "server_busy", "rate_limit_error", headers={"Retry-After": "1"})
            self.pending += 1
            self.stats["requests"] += 1
        self._queue.put(job)

    def _next_batch(self) -> list[Job] | None:
        """Block for one job, then gather more that arrive within the batching window (up to max_batch rows)."""
        job = self._carry.popleft() if self._carry else self._queue.get()
        if job is None:
            return None
        batch, rows = [job], job.request.n
        self._gathering = batch
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

    def _stopped_error(self) -> ApiError:
        return ApiError(503, f"the engine stopped ({self.failure}); restart the server", None, "engine_stopped",
                        "server_error")

    def _run(self) -> None:
        try:
            self._work()
        except BaseException as e:  # the worker is gone: say so, and end every request it would have answered
            log.exception("the engine's worker thread stopped")
            with self._lock:
                self.failure = f"{type(e).__name__}: {e}"
                waiting = [*self._gathering, *self._carry]
                while True:
                    try:
                        job = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if job is not None:
                        waiting.append(job)
                self._carry.clear()
                self.pending = 0
            for job in waiting:
                job.fail(self._stopped_error())

    def _work(self) -> None:
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
                log.exception("generation failed")
                for j in live:
                    j.fail(ApiError(500, f"generation failed: {type(e).__name__}: {e}", None, "generation_error",
                                    "server_error"))
            finally:
                with self._lock:
                    self.pending -= len(batch)
                for j in batch:
                    if j.cancelled and j not in live:
                        j.emit(Event("end"))
                self._gathering = []

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

    def _batch_guard(self, rows: list[Row]) -> Guard | None:
        """One Guard for the batch: per-row bounds, thresholds and coefs (open / +inf / 0 where a row has none)."""
        groups: dict[tuple, dict[str, torch.Tensor]] = {}
        n = len(rows)
        for i, r in enumerate(rows):
            g = r.job.request.guard
            if g is None:
                continue
            kind = g.mode if g.mode == "cap" else ("add" if g.coef is not None else "ablate")
            p = groups.setdefault((g.vector, g.layer, kind, g.positions), {
                "lo": torch.full((n,), -math.inf), "hi": torch.full((n,), math.inf), "coef": torch.zeros(n)})
            if g.lo is not None:
                p["lo"][i] = g.lo
            p["hi"][i] = g.hi if g.hi is not None else math.inf
            p["coef"][i] = g.coef or 0.0
        if not groups:
            return None
        guard = Guard(self.adapter, stops=self.eos_ids)
        for (name, layer, kind, positions), p in groups.items():
            v = self.vectors[name].vector(layer)
            if kind == "cap":
                guard.cap(v, layer, p["lo"], p["hi"], positions)
            else:
                guard.conditional(v, layer, p["hi"], v, layer, p["coef"], positions, kind)
        return guard

    def _capture(self, layers: set[int], store: dict[int, torch.Tensor]) -> ResidualHooks:
        """Hooks recording the last position of each forward at each monitored layer (before steering there)."""
        def recorder(layer: int):
            def record(h: torch.Tensor) -> None:
                store[layer] = h[:, -1].detach().float()

            return record

        return ResidualHooks(self.adapter, [(layer, recorder(layer)) for layer in layers])

    def _projections(self, rows: list[Row], store: dict[int, torch.Tensor]) -> list[dict[str, float | None] | None]:
        out: list[dict[str, float | None] | None] = [None] * len(rows)
        cache: dict[tuple[int, str], torch.Tensor] = {}
        for i, r in enumerate(rows):
            mon = r.job.request.monitor
            if mon is None:
                continue
            vals = {}
            for name in mon.vectors:
                key = (mon.layer_of(name), name)
                if key not in cache:
                    cache[key] = project(store[key[0]], self.vectors[name].vector(key[0])).cpu()
                vals[name] = finite(cache[key][i])
            out[i] = vals
        return out

    def _sample(self, logits: torch.Tensor, rows: list[Row]) -> tuple[list[int], torch.Tensor | None, list[bool]]:
        """Next token per row (greedy below GREEDY_BELOW), log-probs if asked, and which rows went non-finite."""
        logp = torch.log_softmax(logits, dim=-1) if any(r.job.request.logprobs for r in rows) else None
        bad = (~torch.isfinite(logits).all(-1)).tolist()
        toks = logits.nan_to_num(0.0, 0.0, 0.0).argmax(-1).tolist()
        for i, r in enumerate(rows):
            req = r.job.request
            if bad[i] or req.temperature < GREEDY_BELOW:
                continue
            probs = torch.softmax(logits[i] / req.temperature, dim=-1)
            if req.top_p < 1.0:
                sp, si = probs.sort(descending=True)
                cut = (sp.cumsum(-1) - sp) > req.top_p
                sp[cut] = 0.0
                probs = torch.zeros_like(probs).scatter_(0, si, sp)
            if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
                bad[i] = True
                continue
            toks[i] = int(torch.multinomial(probs, 1, generator=r.generator))
        return toks, logp, bad

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
        guard = self._batch_guard(rows)
        store: dict[int, torch.Tensor] = {}
        monitored = {m.layer_of(n) for r in rows if (m := r.job.request.monitor) for n in m.vectors}
        capture = self._capture(monitored, store).attach()  # before the steering hooks: sees unsteered output
        try:
            if steerer is not None:
                steerer.attach()
            if guard is not None:
                guard.attach()
            out = self.adapter.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_for(mask),
                                     use_cache=True, logits_to_keep=1)
            cache, logits = output_cache(out), out.logits[:, -1].float()
            fired: list[bool | None] = list(guard.step_fired) if guard is not None else [None] * len(rows)
            prompt_proj = self._projections(rows, store)
            for i, r in enumerate(rows):
                if r.choice == 0:
                    r.job.emit(Event("prompt", prompt=prompt_proj[i], prompt_tokens=len(r.job.request.prompt_ids)))
            while rows:
                toks, logp, bad = self._sample(logits, rows)
                entries = self._entries(toks, logp, rows)
                for r, t, e, b, f in zip(rows, toks, entries, bad, fired, strict=True):
                    if b:
                        self.stats["errors"] += 1
                        r.job.fail(ApiError(500, NON_FINITE, None, "non_finite_logits", "server_error"))
                    elif not r.job.cancelled:
                        r.accept(t, e, f if r.job.request.guard is not None else None)
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
                    if guard is not None:
                        fired = list(guard.step_fired)
                if watch:
                    for r, p in zip(rows, self._projections(rows, store), strict=True):
                        r.flush(p)
                keep = [i for i, r in enumerate(rows) if not r.finished and not r.job.cancelled]
                if len(keep) < len(rows):
                    if keep:
                        sel = torch.tensor(keep, device=dev)
                        cache.batch_select_indices(sel)
                        mask, logits = mask[sel], logits[sel]
                        if steerer is not None:
                            steerer.select_rows(sel)
                        if guard is not None:
                            guard.select_rows(sel)
                    rows = [rows[i] for i in keep]
                    fired = [fired[i] for i in keep]
        finally:
            capture.remove()
            if steerer is not None:
                steerer.remove()
            if guard is not None:
                guard.remove()

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
