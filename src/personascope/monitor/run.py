"""The paper's two monitoring experiments: a system-prompt ladder and many-shot prompts.

Each answer is generated with a live per-token trace; the projection of the last prompt token is
set against the judged trait score (Pearson r, per layer and per condition). `run_monitor`
returns a `MonitorResult` and writes answers, scores and the report (`monitor_report`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from personascope.judges import Judge, ScoreCache, judge_answers
from personascope.model import ModelAdapter
from personascope.traits import Trait
from personascope.util import JsonlStore, bind_run, bootstrap_ci, fingerprint, pearson_r, progress_bar, read_jsonl
from personascope.vectors import PersonaVector, compute_dtype

from .report import truncate, write_report
from .trace import mean_or_none, trace_generation
from .types import MonitorConfig, MonitorResult

log = logging.getLogger(__name__)

# Pearson r between last-prompt-token projection and trait score (paper)
PAPER_R: dict[str, dict[str, float]] = {
    "evil": {"system": 0.747, "shots": 0.755},
    "sycophantic": {"system": 0.798, "shots": 0.817},
    "hallucinating": {"system": 0.830, "shots": 0.634},
}
PAPER_ALIASES = {"sycophancy": "sycophantic", "hallucination": "hallucinating"}


# ----------------------------------------------------------------------------- the experiments


MONITOR_PROFILES: dict[str, MonitorConfig] = {
    "quick": MonitorConfig(),
    "paper": MonitorConfig(n_questions=None, samples=10, max_new_tokens=1000, batch_size=16, shot_chars=None,
                           examples=8),
}

EXPERIMENT_TITLES = {"system": "system prompts", "shots": "many-shot"}
ANSWER_KEY = ("experiment", "condition", "question", "sample", "prompt_id")


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
            key = (str(rec.get("question")), str(rec.get("answer")))
            target = trait_scores if rec.get("kind") == "trait" else coherence if rec.get("kind") == "coherence" \
                else None
            if target is not None:
                target[key] = max(target.get(key, -1.0), float(rec["score"]))
    skip = set(exclude)
    seen: set[tuple[str, str]] = set()
    cands = []
    for rec in read_jsonl(answers_path):
        q, raw = str(rec.get("question_text") or ""), str(rec.get("answer") or "")
        a = raw.strip()
        if rec.get("side") != "pos" or not q or not a or q in skip or (q, a) in seen:
            continue
        if coherence.get((q, raw), 100.0) < min_coherence:
            continue
        seen.add((q, a))
        cands.append((trait_scores.get((q, raw), -1.0), q, a))
    cands.sort(key=lambda c: -c[0])
    first: list[tuple[str, str]] = []
    rest: list[tuple[str, str]] = []
    used: set[str] = set()
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
            add("system", i, f"{i}: {truncate(system, 38)}", system, [])
    if "shots" in cfg.experiments and pool:
        shots = [(q, truncate(a, cfg.shot_chars)) for q, a in pool]
        for k in cfg.shots:
            if k > len(shots):
                log.warning(f"only {len(shots)} in-context examples are available: skipping {k}-shot")
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
            elapsed = bar.elapsed(task) or 1e-9
            bar.update(task, advance=len(batch), rate=f"{made / elapsed:.2f} answers/s")
    return made


def drop_refusals(records: list[dict]) -> list[dict]:
    """Refusals keep their record but lose `trait_score` (kept as `refused_score`): they are reported and left out
    of r, as the paper's rubric does, rather than counted as answers without the trait."""
    return [{**r, "trait_score": None, "refused_score": r.get("trait_score")} if r.get("refusal") else r
            for r in records]


def analyse(records: list[dict], experiment: str, layer: int, n_layers: int) -> dict:
    """Pearson r (overall, within each condition, over condition means, per layer) and per-condition means."""
    recs = [r for r in records if r["experiment"] == experiment]
    conds = sorted({r["condition"] for r in recs})
    rows = []
    for c in conds:
        rs = [r for r in recs if r["condition"] == c]
        rows.append({
            "condition": c, "label": rs[0]["label"], "system": rs[0]["system"], "n_shots": rs[0]["n_shots"],
            "n": len(rs), "projection_mean": mean_or_none([r["prompt_projection"][layer] for r in rs]),
            "trait_mean": mean_or_none([r["trait_score"] for r in rs]),
            "coherence_mean": mean_or_none([r.get("coherence") for r in rs]),
            "r_within": pearson_r([r["prompt_projection"][layer] for r in rs], [r["trait_score"] for r in rs]),
        })
    xs = [r["prompt_projection"][layer] for r in recs]
    ys = [r["trait_score"] for r in recs]
    return {
        "experiment": experiment, "title": EXPERIMENT_TITLES[experiment], "n": len(recs),
        "n_scored": sum(y is not None for y in ys), "n_refusals": sum(bool(r.get("refusal")) for r in recs),
        "r": pearson_r(xs, ys),
        "r_ci": bootstrap_ci(recs, lambda rs: pearson_r([r["prompt_projection"][layer] for r in rs],
                                                        [r["trait_score"] for r in rs])),
        "r_condition_means": pearson_r([c["projection_mean"] for c in rows], [c["trait_mean"] for c in rows]),
        "r_condition_means_ci": bootstrap_ci(sorted({r["question"] for r in recs}),
                                             lambda qs: condition_means_r(recs, qs, layer)),
        "r_by_layer": [pearson_r([r["prompt_projection"][la] for r in recs], ys) for la in range(n_layers + 1)],
        "conditions": rows,
    }


def condition_means_r(recs: list[dict], questions: Sequence[int], layer: int) -> float | None:
    """Pearson r over condition means, the means taken over `questions` (repeats count again: a bootstrap draw)."""
    by_q: dict[int, list[dict]] = {}
    for r in recs:
        by_q.setdefault(r["question"], []).append(r)
    cells: dict[int, tuple[list[float], list[float]]] = {}
    for q in questions:
        for r in by_q.get(q, []):
            if r["trait_score"] is not None:
                xs, ys = cells.setdefault(r["condition"], ([], []))
                xs.append(r["prompt_projection"][layer])
                ys.append(r["trait_score"])
    means = [(sum(xs) / len(xs), sum(ys) / len(ys)) for xs, ys in cells.values() if xs]
    return pearson_r([m[0] for m in means], [m[1] for m in means])


def paper_r(trait: str, experiment: str) -> float | None:
    return PAPER_R.get(PAPER_ALIASES.get(trait, trait), {}).get(experiment)


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
    force: bool = False,
) -> MonitorResult:
    """Both monitoring experiments: generate (resumable), judge (cached), correlate, plot and write the report.

    `ladder`: system prompts from suppressing to eliciting (default: the built-in one of the trait);
    `shot_pool`: (question, answer) examples showing the trait (default: the pos answers saved
    next to the vector file, see `load_shot_pool`). `out_dir` is bound to the model, sampling and
    judge (other settings are refused unless `force`, which starts over).
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
        from personascope.traits import load_ladder

        ladder = load_ladder(trait.name)
    if shot_pool is None and "shots" in cfg.experiments:
        run_dir = Path(vector.path).parent if vector.path else None
        if run_dir is None or not (run_dir / "answers.jsonl").exists():
            log.warning(f"no answers.jsonl next to {vector.path}: skipping the many-shot experiment "
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
    bind_run(out, {
        "model": adapter.name, "config_hash": adapter.config_hash, "dtype": compute_dtype(adapter),
        "trait": trait.name, "samples": cfg.samples,
        "seed": cfg.seed, "temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens,
        "judge": judge.name, "judge_mode": judge.describe_mode("trait", trait),
        "rubric": fingerprint(trait.eval_prompt),
    }, "monitoring run", force, ("answers.jsonl", "scores.jsonl"))
    store = JsonlStore(out / "answers.jsonl", ANSWER_KEY)
    generate_traced(adapter, jobs, store, vector, layer, cfg)
    answers = [store.record_for(j) for j in jobs]
    scored = judge_answers(judge, trait, answers, ScoreCache(out / "scores.jsonl"), cfg.judge_batch_size,
                           description="judge answers")
    scored = drop_refusals(scored)
    exps = {e: analyse(scored, e, layer, adapter.n_layers) for e in ("system", "shots")
            if any(r["experiment"] == e for r in scored)}
    for e, res in exps.items():
        res["paper_r"] = paper_r(trait.name, e)
    files = write_report(out, trait, adapter, judge, vector, layer, cfg, exps, scored, ladder, shot_pool or [],
                         t0, screenshot)
    result = MonitorResult(trait.name, adapter.name, layer, exps, files, time.time() - t0, scored)
    return result


