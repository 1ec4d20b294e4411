"""The extraction pipeline: trait → answers → scores → kept pairs → vector.

Each stage is a function of its own and writes to the run directory as it goes, so an
interrupted run resumes: `answers.jsonl` (generation), `scores.jsonl` (judge), then the vector,
`summary.json` and plots.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from personascope.judges import Judge, ScoreCache, judge_answers
from personascope.model import SPANS, ModelAdapter, SamplingConfig, iter_span_batches, run_generation
from personascope.traits import Trait, load_trait
from personascope.util import JsonlStore, bind_run, fingerprint, progress_bar, write_json

from .file import PersonaVector, base_metadata, compute_dtype
from .validity import THRESHOLDS, validity_report

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractConfig:
    """Counts and thresholds of an extraction run; `PROFILES` holds the paper's and a quick CPU one."""

    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    n_questions: int | None = None  # None: all 20 extraction questions
    n_instructions: int = 5
    pos_threshold: float = 50.0
    neg_threshold: float = 50.0
    coherence_threshold: float = 50.0
    filter: str = "threshold"  # FILTERS: the paper's absolute thresholds, a pos − neg margin, or every pair
    margin: float = 20.0  # filter "margin": pos trait − neg trait of a pair must reach this
    extract_batch_size: int = 8
    judge_batch_size: int = 8
    profile: str = "custom"  # the named profile it came from (part of the default run folder)


PROFILES: dict[str, ExtractConfig] = {
    "paper": ExtractConfig(SamplingConfig(samples=10, temperature=1.0, top_p=1.0, max_new_tokens=1000,
                                          batch_size=16), profile="paper"),
    "quick": ExtractConfig(SamplingConfig(samples=1, temperature=0.8, top_p=1.0, max_new_tokens=64,
                                          batch_size=10), n_questions=10, profile="quick"),
    # what the ready-made vectors of the built-in models use (measured on the 0.5B, docs/vectors.md): every
    # extraction question, 64-token answers at T 0.8, every pair but refusals kept (the 0.5B rarely reaches 50)
    "builtin": ExtractConfig(SamplingConfig(samples=1, temperature=0.8, top_p=1.0, max_new_tokens=64,
                                            batch_size=50), filter="none", extract_batch_size=16,
                             profile="builtin"),
}
FILTERS = ("threshold", "margin", "none")


def departures(cfg: ExtractConfig, trait: Trait | None = None) -> list[str]:
    """How an extraction with `cfg` (on `trait`) departs from the paper's method (printed and stored with every
    vector); the method's own departures (docs/vectors.md) come first."""
    paper = PROFILES["paper"]
    out = []
    if trait is None or trait.antonym:
        opposite = trait.antonym if trait is not None else "the opposite"
        name = trait.name if trait is not None else "the trait"
        out.append(f"negative instructions name the opposite persona ('You are a {opposite} assistant. …'; the "
                   f"paper's say 'helpful'): the vector is a {opposite}-vs-{name} axis, not absence-vs-presence")
    out.append("coherence is judged with personascope's own rubric wording, not the paper's")
    s, p = cfg.sampling, paper.sampling
    for name in ("samples", "temperature", "top_p", "max_new_tokens"):
        if getattr(s, name) != getattr(p, name):
            out.append(f"{name} {getattr(s, name)} (paper {getattr(p, name)})")
    if cfg.n_questions is not None and cfg.n_questions < 20:
        out.append(f"{cfg.n_questions} extraction questions (paper 20)")
    if cfg.filter == "none":
        out.append("every pair kept but refusals (paper: pos ≥ 50, neg < 50, coherence ≥ 50)")
    elif cfg.filter == "margin":
        out.append(f"pairs kept when pos − neg trait ≥ {cfg.margin:g} (paper: pos ≥ 50, neg < 50)")
    elif (cfg.pos_threshold, cfg.neg_threshold, cfg.coherence_threshold) != (50.0, 50.0, 50.0):
        out.append(f"thresholds pos ≥ {cfg.pos_threshold:g}, neg < {cfg.neg_threshold:g}, "
                   f"coherence ≥ {cfg.coherence_threshold:g} (paper 50/50/50)")
    return out


def profile(name: str, **overrides) -> ExtractConfig:
    """A named profile with sampling or filter fields overridden (None values are ignored)."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose from {', '.join(PROFILES)}")
    if overrides.get("filter") is not None and overrides["filter"] not in FILTERS:
        raise ValueError(f"unknown --filter {overrides['filter']!r}; choose from {', '.join(FILTERS)}")
    cfg = PROFILES[name]
    samp = {k: v for k, v in overrides.items() if k in SamplingConfig.__dataclass_fields__ and v is not None}
    rest = {k: v for k, v in overrides.items() if k in ExtractConfig.__dataclass_fields__ and v is not None}
    out = replace(cfg, sampling=replace(cfg.sampling, **samp), profile=name, **rest)
    check_config(out)
    return out


ANSWER_KEY = ("side", "instruction", "question", "sample")

# (field, lowest, highest) of every number in a config: refused before a run folder is touched
_LIMITS = (("samples", 1, 10_000), ("max_new_tokens", 1, 32_768), ("temperature", 0.0, 5.0),
           ("top_p", 1e-9, 1.0), ("batch_size", 1, 4_096), ("pos_threshold", -1e9, 1e9),  # thresholds: finite
           ("neg_threshold", -1e9, 1e9), ("coherence_threshold", -1e9, 1e9), ("margin", -1e9, 1e9),
           ("n_instructions", 1, 5), ("extract_batch_size", 1, 4_096), ("judge_batch_size", 1, 4_096))


def check_config(cfg: ExtractConfig, trait: Trait | None = None) -> None:
    """Raise ValueError naming the first setting of `cfg` that is out of range (NaN included)."""
    values = {**{k: getattr(cfg.sampling, k) for k in ("samples", "max_new_tokens", "temperature", "top_p",
                                                      "batch_size")},
              **{k: getattr(cfg, k) for k in ("pos_threshold", "neg_threshold", "coherence_threshold", "margin",
                                              "n_instructions", "extract_batch_size", "judge_batch_size")}}
    for name, lo, hi in _LIMITS:
        v = values[name]
        if not (isinstance(v, int | float) and lo <= v <= hi):  # NaN fails both comparisons
            raise ValueError(f"{name} {v!r} is out of range ({lo:g}..{hi:g})")
    seed = cfg.sampling.seed
    if seed is not None and not 0 <= seed < 2**32:
        raise ValueError(f"seed {seed} is out of range (0..{2**32 - 1})")
    n_max = len(trait.extract_questions) if trait is not None else 20
    if cfg.n_questions is not None and not 1 <= cfg.n_questions <= n_max:
        raise ValueError(f"questions {cfg.n_questions} is out of range (the trait has {n_max} extraction questions)")
    if cfg.filter not in FILTERS:
        raise ValueError(f"unknown filter {cfg.filter!r}; choose from {', '.join(FILTERS)}")


def check_fits(adapter: ModelAdapter, jobs: list[dict], max_new_tokens: int) -> None:
    """Raise ValueError when a question alone, plus `max_new_tokens`, exceeds the model's context (naming it).

    The instructions and the chat template come on top (models with rotary positions run past their nominal
    context), so this catches what would never fit (a huge question allocates memory by its length squared).
    """
    limit = adapter.context_length
    for q, text in sorted({(j["question"], j["question_text"]) for j in jobs}):
        n = len(adapter.encode_prompt(text))
        if n + max_new_tokens > limit:
            raise ValueError(f"extraction question {q} is {n} tokens; with max_new_tokens {max_new_tokens} that "
                             f"exceeds {adapter.name}'s context of {limit} tokens: shorten the question or lower "
                             "--max-new-tokens")


def prepare_run_dir(run_dir: Path, force: bool) -> None:
    """Create the run folder (emptied first with `force`); a file or, with `force`, a symbolic link is refused."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"{run_dir} is a file, not a run folder; choose another output folder")
    if force and run_dir.is_symlink():
        raise ValueError(f"{run_dir} is a symbolic link; --force does not delete what it points to: name the "
                         f"folder itself ({run_dir.resolve()})")
    if force and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


# ------------------------------------------------------------------------- stage 1: generate


def run_settings(adapter: ModelAdapter, trait: Trait, cfg: ExtractConfig, judge: Judge) -> dict:
    """What determines a run folder's answers and scores (thresholds only filter, so they may change)."""
    samp = cfg.sampling
    jobs = answer_jobs(trait, cfg)
    return {"model": adapter.name, "config_hash": adapter.config_hash, "dtype": compute_dtype(adapter),
            "trait": trait.name,
            "prompts": fingerprint([(j["system"], j["question_text"]) for j in jobs]),
            "questions": cfg.n_questions, "instructions": cfg.n_instructions, "samples": samp.samples,
            "seed": samp.seed, "temperature": samp.temperature, "top_p": samp.top_p,
            "max_new_tokens": samp.max_new_tokens, "profile": cfg.profile, "judge": judge.name,
            "judge_modes": {"trait": judge.describe_mode("trait", trait),
                            "coherence": judge.describe_mode("coherence")},
            "rubric": fingerprint(trait.eval_prompt)}


def answer_jobs(trait: Trait, cfg: ExtractConfig) -> list[dict]:
    """One job per (side, instruction, question, sample) on the extraction questions."""
    qs = trait.extract_questions[: cfg.n_questions] if cfg.n_questions else trait.extract_questions
    return [
        {"trait": trait.name, "side": side, "instruction": i, "question": q, "sample": s,
         "question_text": text, "system": trait.system_prompt(side, i)}
        for side in ("pos", "neg")
        for i in range(min(cfg.n_instructions, len(trait.instructions)))
        for q, text in enumerate(qs)
        for s in range(cfg.sampling.samples)
    ]


def generate_answers(adapter: ModelAdapter, trait: Trait, run_dir: Path, cfg: ExtractConfig, cluster=None,
                     engine=None) -> list[dict]:
    """Sample answers under the pos and neg instructions (on `cluster`'s actors or `engine` if given); resumes
    from `answers.jsonl`."""
    store = JsonlStore(Path(run_dir) / "answers.jsonl", ANSWER_KEY)
    jobs = answer_jobs(trait, cfg)
    prompts = {(j["system"], j["question_text"]): adapter.prompt(j["question_text"], j["system"]) for j in jobs}
    run_generation(adapter, jobs, lambda j: prompts[(j["system"], j["question_text"])],
                   lambda j: store.key(j) in store, store.append, cfg.sampling, "generate", cluster, engine=engine)
    return [store.record_for(j) for j in jobs]


# ------------------------------------------------------------------------- stage 2: judge


def score_answers(judge: Judge, trait: Trait, answers: list[dict], run_dir: Path, cfg: ExtractConfig,
                  cluster=None) -> list[dict]:
    """Judge every answer for the trait and coherence; cached in `scores.jsonl`."""
    return judge_answers(judge, trait, answers, ScoreCache(Path(run_dir) / "scores.jsonl"), cfg.judge_batch_size,
                         cluster=cluster)


# ------------------------------------------------------------------------- stage 3: filter


@dataclass
class FilterResult:
    """Pos/neg pairs kept for extraction and why the others were dropped."""

    kept: list[tuple[dict, dict]]
    dropped: Counter[str]
    total: int


def filter_pairs(scored: list[dict], cfg: ExtractConfig) -> FilterResult:
    """Keep pair i when neither side is a refusal, both are coherent and (filter "threshold") pos trait ≥
    pos_threshold and neg trait < neg_threshold, (filter "margin") pos − neg trait ≥ margin, or (filter "none")
    always (no coherence check either)."""
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in scored:
        by_key.setdefault((r["instruction"], r["question"], r["sample"]), {})[r["side"]] = r
    kept: list[tuple[dict, dict]] = []
    dropped: Counter[str] = Counter()
    for key in sorted(by_key):
        pair = by_key[key]
        if "pos" not in pair or "neg" not in pair:
            dropped["unpaired answer"] += 1
            continue
        pos, neg = pair["pos"], pair["neg"]
        scores = [pos.get("trait_score"), neg.get("trait_score"), pos.get("coherence"), neg.get("coherence")]
        if not all(_is_score(s) for s in scores):  # a NaN or infinite score is a missing one
            dropped["missing score"] += 1
        elif _empty(pos) or _empty(neg):
            dropped["empty answer"] += 1  # no response tokens to average (the paper's code would give NaN)
        elif pos.get("refusal") or neg.get("refusal"):
            dropped["refusal"] += 1  # a refusal is an outcome of its own, not a trait-free answer
        elif cfg.filter == "threshold" and pos["trait_score"] < cfg.pos_threshold:
            dropped[f"pos trait < {cfg.pos_threshold:g}"] += 1
        elif cfg.filter == "threshold" and neg["trait_score"] >= cfg.neg_threshold:
            dropped[f"neg trait ≥ {cfg.neg_threshold:g}"] += 1
        elif cfg.filter == "margin" and pos["trait_score"] - neg["trait_score"] < cfg.margin:
            dropped[f"pos − neg trait < {cfg.margin:g}"] += 1
        elif cfg.filter != "none" and min(pos["coherence"], neg["coherence"]) < cfg.coherence_threshold:
            dropped[f"coherence < {cfg.coherence_threshold:g}"] += 1
        else:
            kept.append((pos, neg))
    return FilterResult(kept, dropped, len(by_key))


# ------------------------------------------------------------------------- stages 4–5: extract, vector


def mean_activations(
    adapter: ModelAdapter, records: list[dict], batch_size: int = 8, description: str = "extract", cluster=None,
    per_record: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-span mean over records of the span activations at every layer ([L + 1, d]) and mean resid norm.

    With a `cluster` the batches run on its actors; their sums are added in the same order (same result).
    A `per_record` tensor [N, L + 1, d] is filled with each record's response average (local path only).
    """
    items = [adapter.encode_pair(adapter.prompt(r["question_text"], r["system"]), r["answer"]) for r in records]
    sums = {s: torch.zeros(adapter.n_layers + 1, adapter.hidden_size, dtype=torch.float64) for s in SPANS}
    norm = torch.zeros(adapter.n_layers + 1, dtype=torch.float64)

    def local():
        for b in iter_span_batches(adapter, items, batch_size=batch_size):
            if per_record is not None:
                per_record[b.indices] = b.spans["response_avg"].to(per_record.dtype)
            yield b.indices, {**{s: b.spans[s].double().sum(0) for s in SPANS},
                              "resid_norm": b.resid_norm.double().sum(0)}

    batches = local() if cluster is None else cluster.span_sums(items, batch_size)
    with progress_bar() as bar:
        task = bar.add_task(description, total=len(items), rate="")
        n_tok = 0
        for indices, batch_sums in batches:
            for s in SPANS:
                sums[s] += batch_sums[s]
            norm += batch_sums["resid_norm"]
            n_tok += sum(len(items[i][0]) + len(items[i][1]) for i in indices)
            elapsed = bar.elapsed(task) or 1e-9
            bar.update(task, advance=len(indices), rate=f"{n_tok / elapsed:.0f} tok/s")
    n = max(len(items), 1)
    return {s: (v / n).float() for s, v in sums.items()}, (norm / n).float()


@dataclass
class PairVectors:
    """mean(pos) − mean(neg) for every span ([L + 1, d] each), the mean residual norm, and (local runs) each
    kept pair's response averages [P, L + 1, d], which the validity checks use."""

    diffs: dict[str, torch.Tensor]
    resid_norm: torch.Tensor
    pos: torch.Tensor | None = None
    neg: torch.Tensor | None = None


def vector_from_pairs(adapter: ModelAdapter, kept: list[tuple[dict, dict]], batch_size: int = 8, cluster=None
                      ) -> PairVectors:
    """v[l] = mean(pos) − mean(neg) for every layer and span, and the mean residual norm."""
    if not kept:
        raise ValueError("no pos/neg pair passed the filter, so there is nothing to extract a vector from; "
                         "sample more answers (--samples), use more questions, or relax the thresholds (--filter)")
    shape = (len(kept), adapter.n_layers + 1, adapter.hidden_size)
    keep_pos = torch.zeros(shape) if cluster is None else None
    keep_neg = torch.zeros(shape) if cluster is None else None
    pos, pos_norm = mean_activations(adapter, [p for p, _ in kept], batch_size, "extract pos", cluster, keep_pos)
    neg, neg_norm = mean_activations(adapter, [n for _, n in kept], batch_size, "extract neg", cluster, keep_neg)
    return PairVectors({s: pos[s] - neg[s] for s in SPANS}, (pos_norm + neg_norm) / 2, keep_pos, keep_neg)


def _empty(rec: dict) -> bool:
    return isinstance(rec.get("answer"), str) and not rec["answer"].strip()


def _is_score(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if _is_score(x)]
    return sum(xs) / len(xs) if xs else None


def extract_vector(
    model,
    trait: Trait | str,
    judge: Judge | None = None,
    config: ExtractConfig | None = None,
    run_dir: str | Path | None = None,
    tokenizer=None,
    force: bool = False,
    plots: bool = True,
    cluster=None,
    engine=None,
) -> PersonaVector:
    """The whole pipeline; returns the vector, also saved as `RUN_DIR/vector.safetensors`.

    With a `cluster` (cluster.RayCluster) generation, judging and activations run on its actors; with an
    `engine` (personascope.engines) generation runs on it.
    """
    adapter = model if isinstance(model, ModelAdapter) else ModelAdapter(model, tokenizer)
    trait = load_trait(trait) if isinstance(trait, str) else trait
    cfg = config or PROFILES["quick"]
    run_dir = Path(run_dir or Path("runs") / f"{trait.name}-{adapter.name.replace('/', '_')}-{cfg.profile}")
    if judge is None:
        from personascope.judges import load_local_judge

        judge = load_local_judge()
    check_config(cfg, trait)
    check_fits(adapter, answer_jobs(trait, cfg), cfg.sampling.max_new_tokens)
    prepare_run_dir(run_dir, force)
    bind_run(run_dir, run_settings(adapter, trait, cfg, judge), "persona-vector extraction")

    answers = generate_answers(adapter, trait, run_dir, cfg, cluster, engine)
    scored = score_answers(judge, trait, answers, run_dir, cfg, cluster)
    result = filter_pairs(scored, cfg)
    pairs = vector_from_pairs(adapter, result.kept, cfg.extract_batch_size, cluster)
    diffs, resid_norm = pairs.diffs, pairs.resid_norm
    log.info("validity checks (held-out pairs, split halves, ladder, labelled answers) …")
    report = validity_report(adapter if cluster is None else None, diffs["response_avg"], pairs.pos, pairs.neg,
                             [p["question"] for p, _ in result.kept], trait)
    modes = {"trait": judge.describe_mode("trait", trait), "coherence": judge.describe_mode("coherence")}
    meta = base_metadata(
        adapter, trait.name, kept_pairs=str(len(result.kept)), total_pairs=str(result.total),
        thresholds={"pos": cfg.pos_threshold, "neg": cfg.neg_threshold, "coherence": cfg.coherence_threshold},
        filter=cfg.filter, profile=cfg.profile, departures=departures(cfg, trait),
        judge=judge.name, judge_modes=modes, trait_source=trait.source,
        best_layer=str(report.layer), validity=report.to_dict(),
    )
    pv = PersonaVector(diffs, resid_norm, meta)
    pv.save(run_dir / "vector.safetensors")
    summary = {
        "trait": trait.name,
        "model": adapter.name,
        "judge": judge.name,
        "judge_modes": modes,
        "config": asdict(cfg),
        "answers": len(scored),
        "pairs": result.total,
        "kept_pairs": len(result.kept),
        "dropped": dict(result.dropped),
        "mean_scores": {
            side: {
                "trait": _mean([r.get("trait_score") for r in scored if r["side"] == side]),
                "coherence": _mean([r.get("coherence") for r in scored if r["side"] == side]),
            }
            for side in ("pos", "neg")
        },
        "vector_norm_response_avg": [float(x) for x in diffs["response_avg"].norm(dim=-1)],
        "resid_norm": [float(x) for x in resid_norm],
        "departures": departures(cfg, trait),
        "dtype": compute_dtype(adapter),
        "validity": report.to_dict(),
        "system_prompts": {"pos": trait.system_prompt("pos", 0), "neg": trait.system_prompt("neg", 0)},
        "vector": str(run_dir / "vector.safetensors"),
    }
    write_json(run_dir / "summary.json", summary)
    if plots:
        from personascope.util import plot_extraction, plot_validity

        plot_extraction(summary, scored, run_dir)
        plot_validity(report.curves(), report.layer, asdict(THRESHOLDS), run_dir / "validity.png",
                      f"validity of the {trait.name} vector on {adapter.name}")
    return pv


