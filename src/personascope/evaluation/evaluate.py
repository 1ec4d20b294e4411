"""Evaluation: answers to a trait's evaluation questions, judged for trait and coherence, under
steering (coefficient × layer sweeps), a persona guard (cap / conditional), a system prompt, or plain;
plus choosing the layer.

Every condition's answers are keyed by (condition, question, sample) in `answers.jsonl`, scores
go to `scores.jsonl`, so sweeps resume where they stopped.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from personascope.judges import Judge, ScoreCache, fluent_share, judge_answers, score_fluency
from personascope.model import ModelAdapter, SamplingConfig, run_generation
from personascope.steering import GUARD_MODES, Guard, GuardCalibration, Steerer
from personascope.traits import Trait
from personascope.util import JsonlStore, bind_run, fingerprint, write_json
from personascope.vectors import PersonaVector, compute_dtype

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Condition:
    """What the model runs under: plain, a system prompt, and/or one steering vector or guard.

    `guard="cap"` clamps the projection at `layer` into [lo, hi] (None: open); `guard="conditional"`
    adds `coef · v` (coef 0: ablates v̂) wherever the projection is above `hi`.
    """

    layer: int | None = None
    coef: float = 0.0
    positions: str = "response"
    system: str | None = None
    label: str = ""
    guard: str | None = None
    lo: float | None = None
    hi: float | None = None

    @property
    def key(self) -> str:
        if self.label:
            return self.label
        if self.layer is None:
            return "base" if self.system is None else f"system:{self.system}"
        if self.guard == "cap":
            head = f"L{self.layer}:cap[{_bound(self.lo)},{_bound(self.hi)}]"
        elif self.guard == "conditional":
            head = f"L{self.layer}:" + (f"c{self.coef:g}" if self.coef else "ablate") + f"-if>{_bound(self.hi)}"
        else:
            head = f"L{self.layer}:c{self.coef:g}"
        return f"{head}:{self.positions}" + (f":system:{self.system}" if self.system else "")

    @property
    def active(self) -> bool:
        """Whether it hooks the model (steering with a non-zero coef, or a guard)."""
        return self.layer is not None and (self.guard is not None or self.coef != 0)


def _bound(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def guard_annotator(hooks: object) -> Callable[[list[dict]], list[dict]] | None:
    """For a Guard: a batch annotator that records how many tokens it touched per row (`guard_touched`)."""
    if not isinstance(hooks, Guard):
        return None
    guard = hooks

    def annotate(batch: list[dict]) -> list[dict]:
        touched = guard.last.touched if guard.last else [0] * len(batch)
        return [{**r, "guard_touched": t} for r, t in zip(batch, touched, strict=True)]

    return annotate


def condition_hooks(adapter: ModelAdapter, cond: Condition, vector: PersonaVector | None) -> Steerer | Guard:
    """The Steerer or Guard a condition runs under (an empty Steerer when it hooks nothing)."""
    if not cond.active:
        return Steerer(adapter)
    if vector is None:
        raise ValueError(f"condition {cond.key} needs a vector")
    assert cond.layer is not None
    if cond.guard is None:
        return Steerer(adapter).add(vector, cond.layer, cond.coef, cond.positions)
    if cond.guard not in GUARD_MODES:
        raise ValueError(f"unknown guard mode {cond.guard!r}; choose from {', '.join(GUARD_MODES)}")
    if cond.guard == "cap":
        return Guard(adapter).cap(vector, cond.layer, cond.lo, cond.hi, cond.positions)
    if cond.hi is None:
        raise ValueError(f"condition {cond.key}: a conditional guard needs a threshold (hi)")
    return Guard(adapter).conditional(vector, cond.layer, cond.hi, vector, cond.layer, cond.coef or 1.0,
                                      cond.positions, "add" if cond.coef else "ablate")


def guard_conditions(vector: PersonaVector, modes: list[str], coefs: list[float], positions: str = "response",
                     both_sides: bool = False) -> list[Condition]:
    """Guard conditions at the vector's calibrated layer: a cap, and conditional steering per non-zero coef
    (ablation when there is none), all with the calibrated thresholds."""
    cal = GuardCalibration.from_vector(vector)
    if cal is None:
        raise ValueError(f"{vector.path or 'the vector'} has no guard calibration: run `personascope guard "
                         "calibrate` on it first")
    out = []
    for mode in modes:
        if mode not in GUARD_MODES:
            raise ValueError(f"unknown guard mode {mode!r}; choose from {', '.join(GUARD_MODES)}")
        if mode == "cap":
            out.append(Condition(cal.layer, 0.0, positions, guard="cap", lo=cal.lo if both_sides else None,
                                 hi=cal.hi))
        else:
            out += [Condition(cal.layer, c, positions, guard="conditional", hi=cal.hi)
                    for c in ([c for c in coefs if c] or [0.0])]
    return out


def condition_capability(adapter: ModelAdapter, cond: Condition, vector: PersonaVector | None,
                         mc: list[dict]) -> float | None:
    """Multiple-choice accuracy under a condition (None under a system prompt, which MC does not use)."""
    from .capability import mc_accuracy

    if cond.system:
        return None
    return mc_accuracy(adapter, mc, steerer=condition_hooks(adapter, cond, vector)).accuracy


@dataclass(frozen=True)
class EvalConfig:
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(samples=1, temperature=0.0,
                                                                             max_new_tokens=96, batch_size=10))
    n_questions: int | None = None
    judge_batch_size: int = 8


EVAL_PROFILES = {
    "quick": EvalConfig(SamplingConfig(samples=1, temperature=0.0, max_new_tokens=80, batch_size=10),
                        n_questions=8),
    "paper": EvalConfig(SamplingConfig(samples=10, temperature=1.0, top_p=1.0, max_new_tokens=1000,
                                       batch_size=20)),
}


def _stats(xs: list) -> tuple[float | None, float | None]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.pstdev(xs) if len(xs) > 1 else 0.0)


def evaluate(
    adapter: ModelAdapter,
    trait: Trait,
    judge: Judge,
    conditions: list[Condition],
    run_dir: str | Path,
    vector: PersonaVector | None = None,
    cfg: EvalConfig | None = None,
    cluster=None,
    force: bool = False,
    engine=None,
) -> list[dict]:
    """Generate and judge answers for every condition; returns one summary row per condition.

    Resumable: `run_dir` is bound to the model, sampling, judge and vector (other settings are
    refused unless `force`, which starts over); conditions may be added to a folder freely. With a
    `cluster` (cluster.RayCluster) generation (steered on the actors) and judging run on its actors. With an
    `engine` (personascope.engines) unhooked conditions generate there; steered and guarded ones stay on the
    in-process HF model (logged), where steering is exact at every position.
    """
    cfg = cfg or EVAL_PROFILES["quick"]
    run_dir = Path(run_dir)
    if not trait.eval_questions:
        raise ValueError(f"trait {trait.name!r} has no evaluation questions ({trait.source})")
    if vector is not None:
        vector.check(adapter)
    if cluster is not None and any(c.guard for c in conditions):
        raise ValueError("guard conditions run in-process only; drop --cluster or --guard")
    questions = trait.eval_questions[: cfg.n_questions] if cfg.n_questions else trait.eval_questions
    samp = cfg.sampling
    bind_run(run_dir, {
        "model": adapter.name, "config_hash": adapter.config_hash, "dtype": compute_dtype(adapter),
        "trait": trait.name, "questions": fingerprint(questions), "samples": samp.samples, "seed": samp.seed,
        "temperature": samp.temperature, "top_p": samp.top_p, "max_new_tokens": samp.max_new_tokens,
        "judge": judge.name, "judge_mode": judge.describe_mode("trait", trait),
        "rubric": fingerprint(trait.eval_prompt),
        "vector": None if vector is None else fingerprint(vector.vectors["response_avg"].float().numpy().tobytes()),
    }, "steering evaluation", force, ("answers.jsonl", "scores.jsonl"))
    store = JsonlStore(run_dir / "answers.jsonl", ("condition", "question", "sample"))
    scores = ScoreCache(run_dir / "scores.jsonl")
    fluency = JsonlStore(run_dir / "fluency.jsonl", ("condition", "question", "sample"))
    rows = []
    for cond in conditions:
        jobs = [{"condition": cond.key, "question": q, "sample": s, "question_text": text,
                 "system": cond.system, "layer": cond.layer, "coef": cond.coef, "positions": cond.positions}
                for q, text in enumerate(questions) for s in range(cfg.sampling.samples)]
        prompts = {text: adapter.prompt(text, cond.system) for text in questions}
        hooks = condition_hooks(adapter, cond, vector)
        annotate = guard_annotator(hooks)
        on = engine if engine is not None and not cond.active else None
        if engine is not None and on is None:
            log.info("condition %s is steered or guarded: generating with the in-process HF model, not %s",
                      cond.key, getattr(engine, "name", engine))
        with hooks:
            run_generation(adapter, jobs, lambda j: prompts[j["question_text"]], lambda j: store.key(j) in store,
                           store.append, cfg.sampling, f"answer {cond.key}", cluster,
                           hooks.specs if isinstance(hooks, Steerer) else None, annotate, engine=on)
        answers = [store.record_for(j) for j in jobs]
        scored = judge_answers(judge, trait, answers, scores, cfg.judge_batch_size, description=f"judge {cond.key}",
                               cluster=cluster)
        scored = add_fluency(adapter, scored, fluency, prompts)
        t_mean, t_std = _stats([r["trait_score"] for r in scored])
        c_mean, c_std = _stats([r["coherence"] for r in scored])
        alpha = None
        if vector is not None and cond.layer is not None:
            alpha = vector.alpha_from_coef(cond.coef, cond.layer)
        touched: list[int] = [int(r["guard_touched"]) for r in answers if r and r.get("guard_touched") is not None]
        rows.append({
            "condition": cond.key, "layer": cond.layer, "coef": cond.coef, "alpha": alpha,
            "positions": cond.positions, "system": cond.system, "guard": cond.guard, "guard_lo": cond.lo,
            "guard_hi": cond.hi, "guard_touched_mean": statistics.fmean(touched) if touched else None,
            "guard_answers_touched": sum(t > 0 for t in touched) / len(touched) if touched else None,
            "system_rendered": adapter.prompt(questions[0], cond.system),
            "trait_mean": t_mean, "trait_std": t_std, "coherence_mean": c_mean, "coherence_std": c_std,
            "fluent_share": fluent_share([r["fluent"] for r in scored]),
            "fluency_mean": _stats([r["fluency"] for r in scored])[0],
            "n": len(scored), "judge": judge.name, "judge_mode": judge.describe_mode("trait", trait),
            "per_question": [{"question": r["question_text"], "answer": r["answer"],
                              "trait_score": r["trait_score"], "coherence": r["coherence"],
                              "fluent": r["fluent"], "fluency": r["fluency"]} for r in scored],
        })
    write_json(run_dir / "summary.json", [{k: v for k, v in r.items() if k != "per_question"} for r in rows])
    write_json(run_dir / "per_question.json", rows)
    return rows


def add_fluency(adapter: ModelAdapter, scored: list[dict], cache: JsonlStore, prompts: dict[str, str]) -> list[dict]:
    """Records with `fluent` and `fluency` (judges.score_fluency under the unsteered model: call it outside any
    hooks), computed once per answer and kept in `cache` (fluency.jsonl)."""
    todo = [r for r in scored if cache.key(r) not in cache]
    if todo:
        got = score_fluency(adapter, [r["question_text"] for r in todo], [r["answer"] for r in todo],
                            [r["coherence"] for r in todo], [prompts[r["question_text"]] for r in todo])
        cache.append({"condition": r["condition"], "question": r["question"], "sample": r["sample"], **f.to_json()}
                     for r, f in zip(todo, got, strict=True))
    out = []
    for r in scored:
        hit = cache.get(cache.key(r))
        out.append({**r, "fluent": hit["fluent"] if hit else None, "fluency": hit["score"] if hit else None})
    return out


def sweep_conditions(layers: list[int], coefs: list[float], positions: str = "response") -> list[Condition]:
    """Coefficients × layers; coefficient 0 is run once as the shared baseline."""
    conds = [Condition()]
    conds += [Condition(layer, c, positions) for layer in layers for c in coefs if c != 0]
    return conds


def sweep_rows(rows: list[dict], layers: list[int]) -> list[dict]:
    """Rows for a sweep plot: the coefficient-0 baseline repeated under every layer."""
    base = next((r for r in rows if r["layer"] is None and r["system"] is None), None)
    out = [r for r in rows if r["layer"] is not None and not r.get("guard")]
    if base:
        out += [{**base, "layer": layer, "coef": 0.0} for layer in layers]
    return out


MIN_FLUENT = 0.9  # a steered condition is usable when at least this share of its answers is flagged fluent


def coherence_gate(base: dict, min_coherence: float | None = 50.0, max_drop: float | None = 10.0) -> float:
    """The mean coherence a steered condition must keep where fluency was not measured: the lower of
    `min_coherence` and the unsteered baseline's coherence − `max_drop`."""
    bars = [x for x in (min_coherence, None if base.get("coherence_mean") is None or max_drop is None
                        else base["coherence_mean"] - max_drop) if x is not None]
    return min(bars) if bars else float("-inf")


def passes_gate(row: dict, gate: float, min_fluent: float = MIN_FLUENT) -> bool:
    """Whether a steered row's answers are usable: ≥ `min_fluent` of them flagged fluent (judges.fluency), or,
    for rows made before fluency was measured, a mean coherence of at least `gate`."""
    if row.get("fluent_share") is not None:
        return bool(row["fluent_share"] >= min_fluent)
    return row.get("coherence_mean") is not None and row["coherence_mean"] >= gate


def choose_layer(rows: list[dict], min_coherence: float | None = 50.0, max_drop: float | None = 10.0,
                 min_fluent: float = MIN_FLUENT) -> tuple[int | None, dict]:
    """The layer whose steering moves the trait most (in the coefficient's direction) with fluent answers."""
    base = next(r for r in rows if r["layer"] is None and r["system"] is None)
    gate = coherence_gate(base, min_coherence, max_drop)
    best, best_delta, detail = None, float("-inf"), {}
    for r in rows:
        if r["layer"] is None or r["trait_mean"] is None or r.get("guard"):
            continue
        delta = (r["trait_mean"] - base["trait_mean"]) * (1 if r["coef"] > 0 else -1)
        ok = passes_gate(r, gate, min_fluent)
        detail[r["layer"]] = {"trait_change": delta, "coherence": r["coherence_mean"], "eligible": ok,
                              "fluent_share": r.get("fluent_share"), "coherence_gate": gate}
        if ok and delta > best_delta:
            best, best_delta = r["layer"], delta
    return best, detail


def _strength(r: dict) -> float:
    return abs(r["alpha"]) if r.get("alpha") is not None else abs(r["coef"])


def choose_steering(rows: list[dict], min_coherence: float | None = 50.0, max_drop: float | None = 10.0,
                    min_fluent: float = MIN_FLUENT) -> dict:
    """From a sweep over layers and ±coefficients, per direction: at each layer the strongest |α| whose answers
    pass the fluency gate and move the trait that way, then the layer where that moves it most; None for a
    direction where nothing passed."""
    base = next(r for r in rows if r["layer"] is None and r["system"] is None)
    gate = coherence_gate(base, min_coherence, max_drop)
    out: dict = {"base_trait": base["trait_mean"], "base_coherence": base["coherence_mean"], "coherence_gate": gate,
                 "min_fluent": min_fluent}
    for name, sign in (("plus", 1), ("minus", -1)):
        cands = [r for r in rows if r["layer"] is not None and not r.get("guard") and r["trait_mean"] is not None
                 and r["coef"] * sign > 0 and passes_gate(r, gate, min_fluent)
                 and (r["trait_mean"] - base["trait_mean"]) * sign > 0]
        strongest: dict[int, dict] = {}
        for r in cands:
            if r["layer"] not in strongest or _strength(r) > _strength(strongest[r["layer"]]):
                strongest[r["layer"]] = r
        best = max(strongest.values(), key=lambda r: (r["trait_mean"] - base["trait_mean"]) * sign, default=None)
        out[name] = None if best is None else {
            "layer": best["layer"], "coef": best["coef"], "alpha": best.get("alpha"),
            "trait": best["trait_mean"], "coherence": best["coherence_mean"],
            "fluent_share": best.get("fluent_share"), "delta": best["trait_mean"] - base["trait_mean"]}
    return out


def capability_per_row(adapter: ModelAdapter, rows: list[dict], mc_rows: list[dict],
                       vector: PersonaVector | None = None) -> list[float | None]:
    """Multiple-choice accuracy under each row's steering or guard (None for system-prompted rows, which are
    not measured)."""
    out: list[float | None] = []
    for r in rows:
        cond = Condition(r["layer"], r["coef"], r["positions"], r["system"], guard=r.get("guard"),
                         lo=r.get("guard_lo"), hi=r.get("guard_hi"))
        out.append(condition_capability(adapter, cond, vector, mc_rows))
    return out


def write_summary(rows: list[dict], run_dir: Path) -> Path:
    """summary.json: the rows without their per-question detail; returns its path."""
    path = run_dir / "summary.json"
    write_json(path, [{k: v for k, v in r.items() if k != "per_question"} for r in rows])
    return path


