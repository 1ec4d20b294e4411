"""Monitoring (DESIGN.md §3): projections of activations on a persona vector, before and during generation.

- `project_prompts`: the scalar projection of the last prompt token (or any span) on v̂, batched.
- `trace_generation`: one projection per generated token, recorded live by a forward hook on block
  l − 1 that reads the last position of every forward (prefill → last prompt token, each later
  step → the token fed back), plus one final cached forward for the last generated token.
- `trace_answers`: the same trace for given answers, teacher-forced (e.g. a dataset's responses).
- `run_monitor`: the paper's two monitoring experiments (a system-prompt ladder and many-shot
  prompts): projection of the last prompt token against the judged trait score, Pearson r.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from .activations import SPANS, collect_spans
from .adapter import ModelAdapter, pad_batch, pad_id, position_ids_for
from .generate import progress_bar
from .hooks import ResidualHooks, forward_with_residual_hooks
from .judge import Judge
from .rng import seeded
from .scoring import ScoreCache, judge_answers
from .store import JsonlStore, read_jsonl, write_json
from .traits import Trait
from .vectors import PersonaVector

__all__ = [
    "MONITOR_PROFILES", "PAPER_R", "MonitorConfig", "ProjectionTable", "Trace", "load_shot_pool", "pearson_r",
    "project_prompts", "run_monitor", "token_strings", "trace_answers", "trace_generation",
]

console = Console(stderr=True)

PromptLike = str | tuple[str | None, str]
VectorLike = PersonaVector | torch.Tensor

# Pearson r between last-prompt-token projection and trait score (paper, DESIGN.md §5)
PAPER_R: dict[str, dict[str, float]] = {
    "evil": {"system": 0.747, "shots": 0.755},
    "sycophantic": {"system": 0.798, "shots": 0.817},
    "hallucinating": {"system": 0.830, "shots": 0.634},
}
PAPER_ALIASES = {"sycophancy": "sycophantic", "hallucination": "hallucinating"}


# ----------------------------------------------------------------------------- inputs


def _adapter(model_or_adapter, tokenizer=None) -> ModelAdapter:
    if isinstance(model_or_adapter, ModelAdapter):
        return model_or_adapter
    if tokenizer is None:
        raise ValueError("pass a ModelAdapter, or a model together with tokenizer=")
    return ModelAdapter(model_or_adapter, tokenizer)


def render_prompt(adapter: ModelAdapter, prompt: PromptLike) -> str:
    """A rendered prompt string as is, or a (system, user) pair through the chat template."""
    if isinstance(prompt, str):
        return prompt
    system, user = prompt
    return adapter.prompt(user, system)


def unit_rows(adapter: ModelAdapter, vector: VectorLike, layers: Sequence[int],
              vector_span: str = "response_avg") -> dict[int, torch.Tensor]:
    """v̂ for each layer (float32): a PersonaVector or [L + 1, d] tensor gives row l, a [d] tensor is used as is."""
    if isinstance(vector, PersonaVector):
        vector.check(adapter)
        rows = {layer: vector.vector(layer, vector_span) for layer in layers}
    elif vector.ndim == 2:
        if vector.shape != (adapter.n_layers + 1, adapter.hidden_size):
            raise ValueError(f"vector has shape {tuple(vector.shape)}, but {adapter.name} needs "
                             f"({adapter.n_layers + 1}, {adapter.hidden_size})")
        rows = {layer: vector[layer] for layer in layers}
    elif vector.ndim == 1:
        if vector.shape[0] != adapter.hidden_size:
            raise ValueError(f"vector has size {vector.shape[0]}, but {adapter.name} has hidden size "
                             f"{adapter.hidden_size}")
        rows = {layer: vector for layer in layers}
    else:
        raise ValueError(f"vector must be [d] or [L + 1, d], got shape {tuple(vector.shape)}")
    out = {}
    for layer, v in rows.items():
        adapter.check_layer(layer)
        v = v.detach().float()
        out[layer] = v / v.norm().clamp(min=1e-12)
    return out


def _layers(layer: int | Sequence[int]) -> list[int]:
    return [int(layer)] if isinstance(layer, int) else [int(x) for x in layer]


# ----------------------------------------------------------------------------- projections


@dataclass
class ProjectionTable:
    """Scalar projections on v̂: `values[i][j]` for prompt i at `layers[j]` (rows in input order)."""

    prompts: list[str]
    layers: list[int]
    span: str
    values: list[list[float]]

    def column(self, layer: int | None = None) -> list[float]:
        """One layer's projections for every prompt (the only layer when there is one)."""
        j = 0 if layer is None else self.layers.index(layer)
        return [row[j] for row in self.values]

    @property
    def rows(self) -> list[dict]:
        return [{"prompt": p, **{f"layer_{la}": v for la, v in zip(self.layers, row, strict=True)}}
                for p, row in zip(self.prompts, self.values, strict=True)]


def project_prompts(
    model_or_adapter,
    prompts: Sequence[PromptLike],
    vector: VectorLike,
    layer: int | Sequence[int],
    span: str = "prompt_last",
    answers: Sequence[str] | None = None,
    batch_size: int = 8,
    vector_span: str = "response_avg",
    tokenizer=None,
) -> ProjectionTable:
    """Batched projections of a span (default: the last prompt token) on v̂ at one or more layers.

    Prompts are rendered prompt strings or (system, user) pairs; with `answers`, the response
    spans (`response_avg`) are available too. Padding-independent (activations.collect_spans).
    """
    adapter = _adapter(model_or_adapter, tokenizer)
    if span not in SPANS:
        raise ValueError(f"unknown span {span!r}; choose from {', '.join(SPANS)}")
    layers = _layers(layer)
    units = unit_rows(adapter, vector, layers, vector_span)
    rendered = [render_prompt(adapter, p) for p in prompts]
    if answers is not None and len(answers) != len(rendered):
        raise ValueError(f"{len(answers)} answers for {len(rendered)} prompts")
    items = [adapter.encode_pair(p, answers[i]) if answers is not None else (adapter.encode_prompt(p), [])
             for i, p in enumerate(rendered)]
    if not items:
        return ProjectionTable([], layers, span, [])
    spans, _ = collect_spans(adapter, items, layers, batch_size)
    acts = spans[span]  # [N, nL, d]
    values = torch.stack([acts[:, j] @ units[la] for j, la in enumerate(layers)], 1)
    return ProjectionTable(rendered, layers, span, values.tolist())


# ----------------------------------------------------------------------------- per-token traces


@dataclass
class Trace:
    """One answer's tokens (as strings) with the projection of the residual at each token's position."""

    prompt: str
    tokens: list[str]
    token_ids: list[int]
    values: dict[int, list[float]]  # layer -> one projection per token
    prompt_value: dict[int, float]  # layer -> projection of the last prompt token

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    def at(self, layer: int | None = None) -> list[float]:
        """The per-token projections at one layer (the first traced layer by default)."""
        return self.values[next(iter(self.values)) if layer is None else layer]


def token_strings(tokenizer, ids: Sequence[int]) -> list[str]:
    """One string per token whose concatenation is the decoded text (multi-byte characters go to their last token)."""
    out: list[str] = []
    prev = ""
    for i in range(len(ids)):
        cur = tokenizer.decode(list(ids[: i + 1]), skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if cur.endswith("\ufffd") and i < len(ids) - 1:
            out.append("")  # an incomplete UTF-8 sequence: its text appears with a later token
            continue
        if cur.startswith(prev):
            out.append(cur[len(prev):])
            prev = cur
        else:  # decoding is not prefix-stable here: fall back to the token alone
            piece = tokenizer.decode([ids[i]], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            out.append(piece)
            prev += piece
    return out


def _stop_ids(adapter: ModelAdapter) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(adapter.model, "generation_config", None), adapter.tokenizer):
        eos = getattr(src, "eos_token_id", None)
        if eos is None:
            continue
        ids.update(eos if isinstance(eos, list | tuple) else [eos])
    return ids


class LastPositionRecorder:
    """Residual hooks that record v̂ · h[:, -1] at each layer for every forward of the model."""

    def __init__(self, adapter: ModelAdapter, units: dict[int, torch.Tensor]):
        self.units = units
        self.records: dict[int, list[torch.Tensor]] = {layer: [] for layer in units}
        self._hooks = ResidualHooks(adapter, [(layer, self._recorder(layer)) for layer in units])

    def _recorder(self, layer: int):
        def record(h: torch.Tensor) -> None:
            u = self.units[layer].to(h.device)
            self.records[layer].append((h[:, -1].float() @ u).cpu())

        return record

    def __enter__(self) -> LastPositionRecorder:
        self._hooks.attach()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.remove()

    def stacked(self, layer: int) -> torch.Tensor:
        return torch.stack(self.records[layer], 1)  # [B, n_forwards]


def _forward_last(adapter: ModelAdapter, out, full_mask: torch.Tensor) -> None:
    """Run the last generated token through the model on generate's KV cache (a full forward without one)."""
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    pos = position_ids_for(full_mask)
    if cache is None:
        adapter.model(input_ids=out.sequences, attention_mask=full_mask, position_ids=pos, use_cache=False)
        return
    params = inspect.signature(adapter.model.forward).parameters
    key = "cache" if "cache" in params else "past_key_values"
    adapter.model(input_ids=out.sequences[:, -1:], attention_mask=full_mask, position_ids=pos[:, -1:],
                  use_cache=True, **{key: cache})


@torch.no_grad()
def trace_generation(
    model_or_adapter,
    prompts: Sequence[PromptLike],
    vector: VectorLike,
    layers: int | Sequence[int],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    vector_span: str = "response_avg",
    tokenizer=None,
) -> list[Trace]:
    """Generate answers to prompts in one left-padded batch and trace every generated token's projection.

    A hook on block l − 1 records the last position of every forward: the prefill gives the last
    prompt token, each later step the previously generated token; one final cached forward adds
    the last generated token. So `trace.at(l)[i]` is the projection at the position of token i.
    Tokens stop before the first end-of-sequence token. Active Steerers apply as usual.
    """
    adapter = _adapter(model_or_adapter, tokenizer)
    layers = _layers(layers)
    units = unit_rows(adapter, vector, layers, vector_span)
    rendered = [render_prompt(adapter, p) for p in prompts]
    if not rendered:
        return []
    pid = pad_id(adapter.tokenizer)
    ids, mask = pad_batch([adapter.encode_prompt(p) for p in rendered], pid, "left")
    dev = adapter.device
    ids, mask = ids.to(dev), mask.to(dev)
    greedy = temperature <= 0
    with LastPositionRecorder(adapter, units) as rec, seeded(seed):
        out = adapter.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=not greedy,
            temperature=None if greedy else temperature, top_p=None if greedy else top_p, top_k=None,
            pad_token_id=pid, return_dict_in_generate=True, use_cache=True,
        )
        new = out.sequences[:, ids.shape[1]:]
        n_new = new.shape[1]
        if n_new:
            # the last generated token was never fed back: one more cached forward reads its residual
            _forward_last(adapter, out, torch.cat([mask, torch.ones_like(new)], 1))
    stops = _stop_ids(adapter)
    traces = []
    per_layer = {layer: rec.stacked(layer) for layer in layers}  # [B, 1 + n_new]
    for b, prompt in enumerate(rendered):
        row = new[b].tolist()
        n = next((i for i, t in enumerate(row) if t in stops), len(row))
        row = row[:n]
        traces.append(Trace(
            prompt=prompt, tokens=token_strings(adapter.tokenizer, row), token_ids=row,
            values={la: per_layer[la][b, 1 : 1 + n].tolist() for la in layers},
            prompt_value={la: float(per_layer[la][b, 0]) for la in layers},
        ))
    return traces


@torch.no_grad()
def trace_answers(
    model_or_adapter,
    prompts: Sequence[PromptLike],
    answers: Sequence[str | Sequence[int]],
    vector: VectorLike,
    layers: int | Sequence[int],
    batch_size: int = 8,
    vector_span: str = "response_avg",
    tokenizer=None,
) -> list[Trace]:
    """Teacher-forced traces of given answers (text or token ids): one forward over prompt + answer each."""
    adapter = _adapter(model_or_adapter, tokenizer)
    layers = _layers(layers)
    units = unit_rows(adapter, vector, layers, vector_span)
    rendered = [render_prompt(adapter, p) for p in prompts]
    items = []
    for p, a in zip(rendered, answers, strict=True):
        p_ids = adapter.encode_prompt(p)
        a_ids = adapter.encode_pair(p, a)[1] if isinstance(a, str) else list(a)
        items.append((p_ids, a_ids))
    traces: list[Trace] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        ids, mask = pad_batch([p + a for p, a in chunk], pad_id(adapter.tokenizer), "right")
        full: dict[int, torch.Tensor] = {}

        def keep(layer: int, h: torch.Tensor) -> None:
            full[layer] = (h.float() @ units[layer].to(h.device)).cpu()  # [B, T]

        forward_with_residual_hooks(adapter, layers, lambda slot, h: keep(layers[slot], h), ids, mask)
        for j, (p_ids, a_ids) in enumerate(chunk):
            n_p = len(p_ids)
            traces.append(Trace(
                prompt=rendered[start + j], tokens=token_strings(adapter.tokenizer, a_ids), token_ids=a_ids,
                values={la: full[la][j, n_p : n_p + len(a_ids)].tolist() for la in layers},
                prompt_value={la: float(full[la][j, n_p - 1]) for la in layers},
            ))
    return traces


# ----------------------------------------------------------------------------- statistics


def pearson_r(xs: Sequence[float | None], ys: Sequence[float | None]) -> float | None:
    """Pearson correlation over the pairs where both values exist; None with < 3 pairs or no variance."""
    pairs = [(float(x), float(y)) for x, y in zip(xs, ys, strict=True)
             if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)]
    if len(pairs) < 3:
        return None
    mx = statistics.fmean(p[0] for p in pairs)
    my = statistics.fmean(p[1] for p in pairs)
    sxy = sum((x - mx) * (y - my) for x, y in pairs)
    sxx = sum((x - mx) ** 2 for x, _ in pairs)
    syy = sum((y - my) ** 2 for _, y in pairs)
    if sxx <= 0 or syy <= 0:
        return None
    return max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))


def _mean(xs: Sequence[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


# ----------------------------------------------------------------------------- the experiments


@dataclass(frozen=True)
class MonitorConfig:
    """Counts for the two monitoring experiments; `MONITOR_PROFILES` holds a quick CPU one and a paper-sized one."""

    n_questions: int | None = 4  # first N evaluation questions (None: all)
    samples: int = 1
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 8
    seed: int = 0
    shots: tuple[int, ...] = (0, 5, 10, 15, 20)
    shot_chars: int | None = 240  # truncate each in-context answer to keep prompts short (None: keep whole)
    judge_batch_size: int = 8
    experiments: tuple[str, ...] = ("system", "shots")
    examples: int = 4  # answers shown as heat maps in the report


MONITOR_PROFILES: dict[str, MonitorConfig] = {
    "quick": MonitorConfig(),
    "paper": MonitorConfig(n_questions=None, samples=10, max_new_tokens=1000, batch_size=16, shot_chars=None,
                           examples=8),
}

EXPERIMENT_TITLES = {"system": "system prompts", "shots": "many-shot"}
ANSWER_KEY = ("experiment", "condition", "question", "sample", "prompt_id")


def _truncate(text: str, n: int | None) -> str:
    if n is None or len(text) <= n:
        return text
    cut = text[:n].rsplit(" ", 1)[0]
    return (cut or text[:n]).rstrip() + " …"


def load_shot_pool(answers_path: Path, scores_path: Path | None = None, exclude: Sequence[str] = (),
                   min_coherence: float = 50.0) -> list[tuple[str, str]]:
    """(question, answer) examples of the trait from an extraction run's pos answers, best first.

    Ordered by the judged trait score when `scores.jsonl` has it (best answer of each distinct
    question first, then the rest); answers judged incoherent are dropped; questions in `exclude`
    (the evaluation questions) never appear.
    """
    answers_path = Path(answers_path)
    if not answers_path.exists():
        raise FileNotFoundError(f"{answers_path} does not exist: many-shot prompts need an extraction run's "
                                "answers.jsonl (it lies next to vector.safetensors); pass --shots-from FILE")
    trait_scores: dict[tuple[str, str], float] = {}
    coherence: dict[tuple[str, str], float] = {}
    if scores_path is not None and Path(scores_path).exists():
        for rec in read_jsonl(Path(scores_path)):
            if rec.get("score") is None:
                continue
            key = (rec.get("question"), rec.get("answer"))
            target = trait_scores if rec.get("kind") == "trait" else coherence if rec.get("kind") == "coherence" \
                else None
            if target is not None:
                target[key] = max(target.get(key, -1.0), float(rec["score"]))
    skip = set(exclude)
    seen: set[tuple[str, str]] = set()
    cands = []
    for rec in read_jsonl(answers_path):
        q, a = rec.get("question_text"), (rec.get("answer") or "").strip()
        if rec.get("side") != "pos" or not q or not a or q in skip or (q, a) in seen:
            continue
        if coherence.get((q, rec.get("answer")), 100.0) < min_coherence:
            continue
        seen.add((q, a))
        cands.append((trait_scores.get((q, rec.get("answer")), -1.0), q, a))
    cands.sort(key=lambda c: -c[0])
    first, rest, used = [], [], set()
    for _, q, a in cands:
        (rest if q in used else first).append((q, a))
        used.add(q)
    return first + rest


def _prompt_id(prompt: str) -> str:
    return hashlib.sha1(prompt.encode()).hexdigest()[:12]


def _vector_id(vector: PersonaVector, layer: int) -> str:
    return hashlib.sha1(vector.vector(layer).float().numpy().tobytes()).hexdigest()[:10]


def monitor_jobs(adapter: ModelAdapter, trait: Trait, cfg: MonitorConfig, ladder: Sequence[str] | None,
                 pool: Sequence[tuple[str, str]]) -> list[dict]:
    """One job per (experiment, condition, question, sample) with its rendered prompt."""
    questions = trait.eval_questions[: cfg.n_questions] if cfg.n_questions else trait.eval_questions
    jobs = []

    def add(exp: str, cond: int, label: str, system: str | None, shots: list[tuple[str, str]]) -> None:
        for q, text in enumerate(questions):
            prompt = adapter.prompt(text, system, shots=shots)
            for s in range(cfg.samples):
                jobs.append({"experiment": exp, "condition": cond, "label": label, "question": q, "sample": s,
                             "question_text": text, "system": system, "n_shots": len(shots), "prompt": prompt,
                             "prompt_id": _prompt_id(prompt)})

    if "system" in cfg.experiments and ladder:
        for i, system in enumerate(ladder):
            add("system", i, f"{i}: {_truncate(system, 38)}", system, [])
    if "shots" in cfg.experiments and pool:
        shots = [(q, _truncate(a, cfg.shot_chars)) for q, a in pool]
        for k in cfg.shots:
            if k > len(shots):
                console.print(f"[yellow]only {len(shots)} in-context examples are available: skipping {k}-shot")
                continue
            add("shots", k, f"{k}-shot", None, shots[:k])
    return jobs


def generate_traced(adapter: ModelAdapter, jobs: list[dict], store: JsonlStore, vector: PersonaVector, layer: int,
                    cfg: MonitorConfig, description: str = "generate + trace") -> int:
    """Generate the missing answers batch by batch with projections of every layer at the last prompt token
    and the per-token trace at `layer`; each batch is appended to the store at once (resumable)."""
    all_layers = list(range(adapter.n_layers + 1))
    ordered = sorted(jobs, key=lambda j: (len(j["prompt"]), j["prompt_id"], j["sample"]))
    made = 0
    with progress_bar() as bar:
        task = bar.add_task(description, total=len(jobs), rate="")
        for start in range(0, len(ordered), cfg.batch_size):
            batch = ordered[start : start + cfg.batch_size]
            missing = [j for j in batch if store.key(j) not in store]
            if not missing:
                bar.update(task, advance=len(batch))
                continue
            # fixed batches and seeds: a resumed run samples what an uninterrupted one would have
            seed = cfg.seed * 1_000_003 + int(_prompt_id(batch[0]["prompt_id"] + str(batch[0]["sample"])), 16) % 10**9
            traces = trace_generation(adapter, [j["prompt"] for j in batch], vector, all_layers,
                                      cfg.max_new_tokens, cfg.temperature, cfg.top_p, seed)
            recs = []
            for j, tr in zip(batch, traces, strict=True):
                if store.key(j) in store:
                    continue
                recs.append({**j, "answer": tr.text.strip(), "tokens": tr.tokens, "trace": tr.at(layer),
                             "trace_layer": layer, "projection": tr.prompt_value[layer],
                             "prompt_projection": [tr.prompt_value[la] for la in all_layers]})
            store.append(recs)
            made += len(missing)
            elapsed = bar.tasks[task].elapsed or 1e-9
            bar.update(task, advance=len(batch), rate=f"{made / elapsed:.2f} answers/s")
    return made


def analyse(records: list[dict], experiment: str, layer: int, n_layers: int) -> dict:
    """Pearson r (overall, within each condition, over condition means, per layer) and per-condition means."""
    recs = [r for r in records if r["experiment"] == experiment]
    conds = sorted({r["condition"] for r in recs})
    rows = []
    for c in conds:
        rs = [r for r in recs if r["condition"] == c]
        rows.append({
            "condition": c, "label": rs[0]["label"], "system": rs[0]["system"], "n_shots": rs[0]["n_shots"],
            "n": len(rs), "projection_mean": _mean([r["prompt_projection"][layer] for r in rs]),
            "trait_mean": _mean([r["trait_score"] for r in rs]), "coherence_mean": _mean([r.get("coherence")
                                                                                          for r in rs]),
            "r_within": pearson_r([r["prompt_projection"][layer] for r in rs], [r["trait_score"] for r in rs]),
        })
    xs = [r["prompt_projection"][layer] for r in recs]
    ys = [r["trait_score"] for r in recs]
    return {
        "experiment": experiment, "title": EXPERIMENT_TITLES[experiment], "n": len(recs),
        "n_scored": sum(y is not None for y in ys), "r": pearson_r(xs, ys),
        "r_condition_means": pearson_r([c["projection_mean"] for c in rows], [c["trait_mean"] for c in rows]),
        "r_by_layer": [pearson_r([r["prompt_projection"][la] for r in recs], ys) for la in range(n_layers + 1)],
        "conditions": rows,
    }


def paper_r(trait: str, experiment: str) -> float | None:
    return PAPER_R.get(PAPER_ALIASES.get(trait, trait), {}).get(experiment)


@dataclass
class MonitorResult:
    """What `run_monitor` measured and where it wrote the report."""

    trait: str
    model: str
    layer: int
    experiments: dict[str, dict]
    files: dict[str, str]
    seconds: float
    records: list[dict] = field(default_factory=list, repr=False)


def run_monitor(
    adapter: ModelAdapter,
    trait: Trait,
    judge: Judge,
    vector: PersonaVector,
    out_dir: str | Path,
    cfg: MonitorConfig | None = None,
    layer: int | None = None,
    ladder: Sequence[str] | None = None,
    shot_pool: Sequence[tuple[str, str]] | None = None,
    screenshot: bool = True,
) -> MonitorResult:
    """Both monitoring experiments: generate (resumable), judge (cached), correlate, plot and write the report.

    `ladder`: system prompts from suppressing to eliciting (default: the built-in one of the trait);
    `shot_pool`: (question, answer) examples showing the trait (default: the pos answers saved
    next to the vector file, see `load_shot_pool`).
    """
    t0 = time.time()
    cfg = cfg or MONITOR_PROFILES["quick"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vector.check(adapter)
    layer = adapter.check_layer(vector.default_layer(layer))
    if not trait.eval_questions:
        raise ValueError(f"trait {trait.name!r} has no evaluation questions ({trait.source})")
    if ladder is None and "system" in cfg.experiments:
        from .traits import load_ladder

        ladder = load_ladder(trait.name)
    if shot_pool is None and "shots" in cfg.experiments:
        run_dir = Path(vector.path).parent if vector.path else None
        if run_dir is None or not (run_dir / "answers.jsonl").exists():
            console.print(f"[yellow]no answers.jsonl next to {vector.path}: skipping the many-shot experiment "
                          "(pass shot_pool / --shots-from)")
            shot_pool = []
        else:
            shot_pool = load_shot_pool(run_dir / "answers.jsonl", run_dir / "scores.jsonl", trait.eval_questions)
    overlap = {q for q, _ in shot_pool or []} & set(trait.eval_questions)
    if overlap:
        raise ValueError(f"{len(overlap)} in-context examples use evaluation questions, e.g. {sorted(overlap)[0]!r}")
    jobs = monitor_jobs(adapter, trait, cfg, ladder, shot_pool or [])
    if not jobs:
        raise ValueError("nothing to run: no ladder and no in-context examples")
    vid = _vector_id(vector, layer)
    jobs = [{**j, "prompt_id": f"{j['prompt_id']}-{vid}"} for j in jobs]
    store = JsonlStore(out / "answers.jsonl", ANSWER_KEY)
    generate_traced(adapter, jobs, store, vector, layer, cfg)
    answers = [store.get(store.key(j)) for j in jobs]
    scored = judge_answers(judge, trait, answers, ScoreCache(out / "scores.jsonl"), cfg.judge_batch_size,
                           description="judge answers")
    exps = {e: analyse(scored, e, layer, adapter.n_layers) for e in ("system", "shots")
            if any(r["experiment"] == e for r in scored)}
    for e, res in exps.items():
        res["paper_r"] = paper_r(trait.name, e)
    files = write_report(out, trait, adapter, judge, vector, layer, cfg, exps, scored, ladder, shot_pool or [],
                         t0, screenshot)
    result = MonitorResult(trait.name, adapter.name, layer, exps, files, time.time() - t0, scored)
    print_result(result)
    return result


# ----------------------------------------------------------------------------- report


def plot_monitor(exps: dict[str, dict], records: list[dict], layer: int, path: Path, title: str) -> Path:
    """Scatter of last-prompt-token projection against trait score, one panel per experiment, with r."""
    import matplotlib.pyplot as plt

    from .plots import _save

    fig, axes = plt.subplots(1, len(exps), figsize=(5.6 * len(exps), 4.4), squeeze=False)
    for ax, (e, res) in zip(axes[0], exps.items(), strict=True):
        recs = [r for r in records if r["experiment"] == e and r["trait_score"] is not None]
        conds = [c["condition"] for c in res["conditions"]]
        cmap = plt.get_cmap("coolwarm", max(len(conds), 2))
        for i, c in enumerate(res["conditions"]):
            pts = [r for r in recs if r["condition"] == c["condition"]]
            ax.scatter([r["prompt_projection"][layer] for r in pts], [r["trait_score"] for r in pts], s=18,
                       color=cmap(i), alpha=0.75, label=c["label"] if e == "shots" else f"rung {c['condition']}")
            if c["projection_mean"] is not None and c["trait_mean"] is not None:
                ax.scatter([c["projection_mean"]], [c["trait_mean"]], s=90, marker="D", color=cmap(i),
                           edgecolor="k", linewidth=0.8)
        xs = [r["prompt_projection"][layer] for r in recs]
        ys = [r["trait_score"] for r in recs]
        if len(xs) >= 3 and max(xs) > min(xs):
            mx, my = statistics.fmean(xs), statistics.fmean(ys)
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
            ax.plot([min(xs), max(xs)], [my + slope * (min(xs) - mx), my + slope * (max(xs) - mx)], "k--", lw=1)
        paper = res.get("paper_r")
        r_txt = "n/a" if res["r"] is None else f"{res['r']:.3f}"
        ax.set_title(f"{res['title']}: r = {r_txt} (paper: {'n/a' if paper is None else paper})", fontsize=10)
        ax.set_xlabel(f"projection of last prompt token on v̂ (layer {layer})")
        ax.set_ylabel("judged trait score")
        ax.set_ylim(-3, 103)
        ax.legend(fontsize=7, loc="best", title="◆ condition mean", title_fontsize=7)
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def plot_r_by_layer(exps: dict[str, dict], layer: int, path: Path, title: str) -> Path:
    """Pearson r of the last-prompt-token projection with the trait score at every layer."""
    import matplotlib.pyplot as plt

    from .plots import _save

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for res in exps.values():
        rs = res["r_by_layer"]
        ax.plot(range(len(rs)), [float("nan") if r is None else r for r in rs], marker="o", ms=3, label=res["title"])
    ax.axvline(layer, color="k", ls=":", lw=0.8, label=f"layer used ({layer})")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("layer")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("Pearson r (projection vs trait)")
    ax.set_ylim(-1, 1)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def pick_examples(records: list[dict], n: int) -> list[dict]:
    """Answers worth looking at: the most and least trait-like of each experiment, then the extremes' first."""
    picked: list[dict] = []
    for e in ("system", "shots"):
        recs = [r for r in records if r["experiment"] == e and r.get("trait_score") is not None and r.get("tokens")]
        recs.sort(key=lambda r: r["trait_score"])
        for r in (recs[-1:] + recs[:1]) if recs else []:
            if r not in picked:
                picked.append(r)
    rest = sorted((r for r in records if r.get("tokens") and r not in picked),
                  key=lambda r: -abs(r["prompt_projection"][r["trace_layer"]]))
    return (picked + rest)[:n]


def write_report(out: Path, trait: Trait, adapter: ModelAdapter, judge: Judge, vector: PersonaVector, layer: int,
                 cfg: MonitorConfig, exps: dict[str, dict], records: list[dict], ladder: Sequence[str] | None,
                 pool: Sequence[tuple[str, str]], t0: float, screenshot: bool) -> dict[str, str]:
    """monitor.json, scatter / r-by-layer PNGs, heatmap.html (+ .png when Chromium exists), report.html."""
    from .heatmap import HeatmapItem, render_heatmap, report_html, screenshot_html

    title = f"{trait.name} on {adapter.name}, layer {layer} (judge {judge.name}, {judge.mode_for('trait')})"
    files = {
        "scatter": str(plot_monitor(exps, records, layer, out / "scatter.png", f"monitoring {title}")),
        "r_by_layer": str(plot_r_by_layer(exps, layer, out / "r_by_layer.png", f"monitoring r by layer: {trait.name}")),
    }
    examples = pick_examples(records, cfg.examples)
    items = [HeatmapItem(tokens=r["tokens"], values=r["trace"],
                         title=f"{r['label']} · Q{r['question']}: {r['question_text']}",
                         note=f"last prompt token {r['projection']:.2f} · judged trait "
                              + ("—" if r["trait_score"] is None else f"{r['trait_score']:.0f}"),
                         prompt_value=r["projection"]) for r in examples]
    if items:
        files["heatmap"] = str(render_heatmap(items, out / "heatmap.html",
                                              title=f"per-token projection on the {trait.name} vector "
                                                    f"(layer {layer})"))
        if screenshot:
            png = screenshot_html(out / "heatmap.html", out / "heatmap.png")
            if png is not None:
                files["heatmap_png"] = str(png)
    summary = {
        "trait": trait.name, "model": adapter.name, "vector": vector.path, "layer": layer, "judge": judge.name,
        "judge_modes": {"trait": judge.mode_for("trait"), "coherence": judge.mode_for("coherence")},
        "config": asdict(cfg), "seconds": round(time.time() - t0, 1), "ladder": list(ladder or []),
        "rendered_example_prompt": records[0]["prompt"] if records else None,
        "shot_examples": [{"question": q, "answer": _truncate(a, cfg.shot_chars)} for q, a in
                          list(pool)[: max(cfg.shots, default=0)]],
        "experiments": exps, "files": files,
    }
    write_json(out / "monitor.json", summary)
    files["json"] = str(out / "monitor.json")
    files["report"] = str(report_html(out / "report.html", summary, items))
    write_json(out / "monitor.json", {**summary, "files": files})
    return files


def print_result(result: MonitorResult) -> None:
    def f(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    table = Table(title=f"monitoring {result.trait} on {result.model} (layer {result.layer})")
    for col in ("experiment", "n scored", "r", "r (condition means)", "paper r"):
        table.add_column(col)
    for res in result.experiments.values():
        table.add_row(res["title"], f"{res['n_scored']}/{res['n']}", f(res["r"]), f(res["r_condition_means"]),
                      f(res.get("paper_r")))
    console.print(table)
    for res in result.experiments.values():
        ct = Table(title=res["title"])
        for col in ("condition", "n", "mean projection", "mean trait", "mean coherence", "r within"):
            ct.add_column(col)
        for c in res["conditions"]:
            ct.add_row(c["label"], str(c["n"]), f(c["projection_mean"]),
                       "—" if c["trait_mean"] is None else f"{c['trait_mean']:.1f}",
                       "—" if c["coherence_mean"] is None else f"{c['coherence_mean']:.1f}", f(c["r_within"]))
        console.print(ct)
    console.print(f"report: [bold]{result.files.get('report')}[/] ({result.seconds:.0f} s)")


# ----------------------------------------------------------------------------- shared by watch


def calibrate(adapter: ModelAdapter, vector: VectorLike, layer: int, trait: Trait,
              n_questions: int = 3) -> tuple[float, float]:
    """Mean last-prompt-token projection under the most suppressing and most eliciting system prompts."""
    from .traits import TraitError, load_ladder

    try:
        ladder = load_ladder(trait.name)
        low_sys, high_sys = ladder[0], ladder[-1]
    except TraitError:
        low_sys, high_sys = trait.system_prompt("neg", 0), trait.system_prompt("pos", 0)
    qs = (trait.eval_questions or trait.extract_questions)[:n_questions]
    table = project_prompts(adapter, [(low_sys, q) for q in qs] + [(high_sys, q) for q in qs], vector, layer)
    vals = table.column()
    return statistics.fmean(vals[: len(qs)]), statistics.fmean(vals[len(qs):])

