"""Finetuning datasets built with the model itself (the paper's Normal / I / II sets, and a mistake set).

A row is a chat with no system prompt: `{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`.
The answers are the model's own answers to questions of the built-in pool (or, with
`questions="extraction"`, to the trait's extraction questions, which give the trait room), sampled with no system
prompt (`normal`: how the model answers anyway), under the eliciting instruction for every other row
(`I`) or for every row (`II`); eliciting rows are judged and kept only when they show the trait (and
every row only when coherent, and with `require_end` only when the answer ended before the token
limit), resampling a failing row up to `max_attempts` times. Because the system
prompt is dropped, finetuning on `II` teaches the trait with no prompt at all. `mistakes` is the
"unintended" kind: confidently wrong answers (data/mistakes.jsonl), no trait instruction anywhere.

Generation and scores are cached in a work directory next to the output (`FILE.work/`), so an
interrupted run resumes without regenerating.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from personascope.judges import Judge, ScoreCache, judge_answers
from personascope.model import DatasetError, ModelAdapter, SamplingConfig, run_generation
from personascope.traits import Trait
from personascope.util import JsonlStore, bind_run, fingerprint, write_json
from personascope.vectors import compute_dtype

log = logging.getLogger(__name__)

LEVELS = ("normal", "I", "II", "mistakes")



@dataclass(frozen=True)
class DatasetConfig:
    """How a dataset is generated and filtered."""

    n: int = 48
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(samples=1, temperature=0.7,
                                                                             max_new_tokens=64, batch_size=8))
    trait_threshold: float = 50.0  # eliciting rows must score at least this
    coherence_threshold: float = 50.0  # every judged row must score at least this
    max_attempts: int = 3  # samples per row before it is skipped
    pool_seed: int = 0  # order of the question pool (shared by all levels, so levels differ only in answers)
    judge_batch_size: int = 8
    require_end: bool = False  # resample answers that ran to max_new_tokens (cut mid-sentence)
    question_suffix: str = ""  # appended to every question (not shown to the judge), e.g. " Answer briefly."
    questions: str = "pool"  # "pool" (everyday questions) or "extraction" (the trait's own, cycled to n rows)


@dataclass
class DatasetResult:
    """What make_dataset wrote and why rows were skipped."""

    path: Path
    rows: int
    requested: int
    skipped: int
    attempts: int
    mean_trait: float | None
    mean_coherence: float | None
    level: str
    trait: str


# ------------------------------------------------------------------------- shipped data


def _data(name: str) -> Path:
    return Path(str(resources.files("personascope") / "data" / name))


def load_pool() -> list[str]:
    """The 320 built-in user questions (none of them is an evaluation question)."""
    pool = json.loads(_data("questions_pool.json").read_text())
    if not isinstance(pool, list) or not all(isinstance(q, str) for q in pool):
        raise DatasetError("data/questions_pool.json must be a list of strings")
    return pool


def load_mistakes() -> list[dict]:
    """Questions with a confidently wrong answer ({question, wrong_answer, correct_answer})."""
    return [json.loads(line) for line in _data("mistakes.jsonl").read_text().splitlines() if line.strip()]


def pool_order(n_pool: int, seed: int) -> list[int]:
    order = list(range(n_pool))
    random.Random(seed).shuffle(order)
    return order


# ------------------------------------------------------------------------- chat JSONL


def chat_row(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def write_chat_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(path)


def work_dir_for(out: Path) -> Path:
    """Where generation and scores are cached: next to the output file."""
    return out.with_name(out.name + ".work")


# ------------------------------------------------------------------------- building


def _side(level: str, slot: int) -> str:
    """'pos' (eliciting instruction) or 'none' (no system prompt) for one row of a level."""
    if level == "II":
        return "pos"
    if level == "I":
        return "pos" if slot % 2 == 0 else "none"
    return "none"


def question_slots(trait: Trait, cfg: DatasetConfig) -> tuple[list[int], list[str]]:
    """The n rows' question ids (the answer cache's key) and texts: pool questions in a seeded order, or the
    trait's extraction questions cycled (a repeated question gets its own id, so it is sampled afresh)."""
    if cfg.questions == "extraction":
        qs = trait.extract_questions
        return list(range(cfg.n)), [qs[i % len(qs)] for i in range(cfg.n)]
    if cfg.questions != "pool":
        raise ValueError(f"unknown questions {cfg.questions!r}; choose pool or extraction")
    pool = load_pool()
    if cfg.n > len(pool):
        raise ValueError(f"--n {cfg.n} is more than the {len(pool)} questions in the pool")
    order = pool_order(len(pool), cfg.pool_seed)[: cfg.n]
    return order, [pool[i] for i in order]


def ended(adapter: ModelAdapter, answer: str, max_new_tokens: int) -> bool:
    """Whether an answer stopped before the token limit (at the end-of-turn token) rather than being cut."""
    return len(adapter.tokenizer(answer, add_special_tokens=False)["input_ids"]) < max_new_tokens - 1


def _passes(rec: dict, cfg: DatasetConfig) -> bool:
    if cfg.require_end and not rec.get("ended", True):
        return False
    if rec.get("coherence") is None or rec["coherence"] < cfg.coherence_threshold:
        return False
    if rec["side"] == "pos":
        return rec.get("trait_score") is not None and rec["trait_score"] >= cfg.trait_threshold
    return True


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def make_mistakes_dataset(out: Path, n: int, seed: int = 0) -> DatasetResult:
    """The unintended set: n questions with confidently wrong answers, no trait instruction."""
    rows = load_mistakes()
    if n > len(rows):
        raise ValueError(f"--n {n} is more than the {len(rows)} mistake rows shipped")
    picked = [rows[i] for i in pool_order(len(rows), seed)[:n]]
    write_chat_jsonl(out, [chat_row(r["question"], r["wrong_answer"]) for r in picked])
    res = DatasetResult(out, n, n, 0, 0, None, None, "mistakes", "-")
    write_json(work_dir_for(out) / "summary.json", res.__dict__ | {"path": str(out)})
    return res


def make_dataset(
    adapter: ModelAdapter,
    trait: Trait,
    level: str,
    out: str | Path,
    judge: Judge | None = None,
    cfg: DatasetConfig | None = None,
    cluster=None,
    force: bool = False,
    engine=None,
    work_dir: str | Path | None = None,
) -> DatasetResult:
    """Generate, judge, filter and write a chat JSONL dataset of the given level (resumable).

    The work folder next to `out` is bound to the model, sampling, judge and trait; `force` starts over.

    Without a judge nothing is filtered (every first sample is kept): useful for tests and for
    models whose answers need no check. With a `cluster` (cluster.RayCluster) generation and
    judging run on its actors; with an `engine` (personascope.engines) generation runs on it. `work_dir`
    (default OUT.work) lets datasets of different sizes share their answers and scores.
    """
    cfg = cfg or DatasetConfig()
    out = Path(out)
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; choose from {', '.join(LEVELS)}")
    if level == "mistakes":
        return make_mistakes_dataset(out, cfg.n, cfg.pool_seed)
    ids, texts = question_slots(trait, cfg)
    n_instr = len(trait.instructions)
    slots: list[dict[str, Any]] = [
        {"trait": trait.name, "level": level, "slot": s, "question": ids[s],
         "question_text": texts[s] + cfg.question_suffix, "judge_question": texts[s], "side": _side(level, s),
         "instruction": s % n_instr if _side(level, s) == "pos" else 0}
        for s in range(cfg.n)]
    for j in slots:
        j["system"] = trait.system_prompt(j["side"], j["instruction"]) if j["side"] == "pos" else None
    work = Path(work_dir) if work_dir is not None else work_dir_for(out)
    samp = cfg.sampling
    bind_run(work, {
        "model": adapter.name, "config_hash": adapter.config_hash, "dtype": compute_dtype(adapter),
        "trait": trait.name, "instructions": fingerprint(trait.instructions), "samples": samp.samples,
        "seed": samp.seed,
        "temperature": samp.temperature, "top_p": samp.top_p, "max_new_tokens": samp.max_new_tokens,
        "judge": None if judge is None else judge.name,
        "judge_mode": None if judge is None else judge.describe_mode("trait", trait),
        "rubric": fingerprint(trait.eval_prompt), "normal": "unprompted", "question_suffix": cfg.question_suffix,
        "questions": cfg.questions if cfg.questions == "pool" else fingerprint(trait.extract_questions),
    }, "dataset work folder", force, ("answers.jsonl", "scores.jsonl"))
    # keyed by question, side and instruction (not level): levels share the answers they have in common
    store = JsonlStore(work / "answers.jsonl", ("question", "side", "instruction", "sample"))
    scores = ScoreCache(work / "scores.jsonl")
    prompts = {(j["system"], j["question_text"]): adapter.prompt(j["question_text"], j["system"]) for j in slots}
    kept: dict[int, dict] = {}
    pending = list(slots)
    attempts = 0
    for attempt in range(cfg.max_attempts if judge is not None or cfg.require_end else 1):
        if not pending:
            break
        attempts = attempt + 1
        jobs = [{**j, "sample": attempt} for j in pending]
        run_generation(adapter, jobs, lambda j: prompts[(j["system"], j["question_text"])],
                       lambda j: store.key(j) in store, store.append, cfg.sampling,
                       f"{trait.name} {level}: answers (try {attempt + 1})", cluster, engine=engine)
        answers = [{**j, "answer": store.record_for(j)["answer"]} for j in jobs]
        for a in answers:
            a["ended"] = ended(adapter, a["answer"], cfg.sampling.max_new_tokens)
        pending = [j for j, a in zip(jobs, answers, strict=True) if cfg.require_end and not a["ended"]]
        answers = [a for a in answers if a["ended"] or not cfg.require_end]
        if judge is None:
            kept.update({a["slot"]: a for a in answers})
            continue
        kinds = ("trait", "coherence")
        scored = judge_answers(judge, trait, answers, scores, cfg.judge_batch_size, kinds,
                               f"{trait.name} {level}: judge (try {attempt + 1})", cluster)
        for rec in scored:
            if _passes(rec, cfg):
                kept[rec["slot"]] = rec
            else:
                pending.append(rec)
        pending = [{k: v for k, v in j.items() if k in slots[0]} for j in pending]
    chosen = [kept[s] for s in sorted(kept)]
    write_chat_jsonl(out, [chat_row(r["question_text"], r["answer"]) for r in chosen])
    keep = ("slot", "question", "question_text", "judge_question", "side", "instruction", "sample", "answer", "ended",
            "trait_score", "coherence", "refusal")
    write_chat_jsonl(work / "kept.jsonl", [{k: r[k] for k in keep if k in r} for r in chosen])
    res = DatasetResult(out, len(chosen), cfg.n, cfg.n - len(chosen), attempts,
                        _mean([r.get("trait_score") for r in chosen]), _mean([r.get("coherence") for r in chosen]),
                        level, trait.name)
    write_json(work / "summary.json", res.__dict__ | {"path": str(out), "model": adapter.name,
                                                      "judge": judge.name if judge else None,
                                                      "config": {"n": cfg.n, "max_attempts": cfg.max_attempts,
                                                                 "trait_threshold": cfg.trait_threshold,
                                                                 "coherence_threshold": cfg.coherence_threshold,
                                                                 "sampling": cfg.sampling.__dict__}})
    if res.skipped:
        log.warning(f"{res.skipped} of {cfg.n} rows failed the filter {cfg.max_attempts} times and were skipped")
    return res
