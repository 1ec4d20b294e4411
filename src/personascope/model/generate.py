"""Batched sampling of answers (left padding, attention masks), written to JSONL as batches finish."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from personascope.util import progress_bar, seeded

from .adapter import ModelAdapter, pad_batch, pad_id


@dataclass(frozen=True)
class SamplingConfig:
    """How answers are sampled (paper: 10 samples, temperature 1, top_p 1, 1000 new tokens)."""

    samples: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    batch_size: int = 8
    seed: int = 0


class ExponentialSampler(LogitsProcessor):
    """Samples the next token (temperature, top-p) by the exponential race and marks it as the only choice.

    argmax(p_i / E_i) with E_i ~ Exp(1) is a draw from p; it avoids torch.multinomial, whose CPU cost over a
    150k vocabulary equals a 0.5B model's forward pass. It draws from its own generator, not the global RNG.
    """

    def __init__(self, temperature: float, top_p: float, generator: torch.Generator):
        self.temperature, self.top_p, self.generator = temperature, top_p, generator

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = (scores.float() / self.temperature).softmax(-1)
        if self.top_p < 1.0:
            sorted_p, order = probs.sort(-1, descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p > self.top_p  # keep the smallest prefix reaching top_p
            probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        race = torch.empty_like(probs).exponential_(generator=self.generator)
        choice = (probs / race).argmax(-1)
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(len(choice), device=scores.device), choice] = 0.0
        return out


@torch.no_grad()
def generate_batch(
    adapter: ModelAdapter,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> list[str]:
    """Answers to rendered prompts (one each), sampled in one left-padded batch; greedy at temperature 0."""
    ids, mask = pad_batch([adapter.encode_prompt(p) for p in prompts], pad_id(adapter.tokenizer), "left")
    dev = adapter.device
    greedy = temperature <= 0
    with seeded(seed):
        # sampling runs in a logits processor (see ExponentialSampler) and HF then takes the argmax: same
        # distribution as do_sample, without torch.multinomial, which costs as much as the forward pass on CPU
        gen = torch.Generator(device=dev)
        gen.manual_seed(int(torch.randint(0, 2**62, (1,)).item()) if seed is None else seed)
        out = adapter.model.generate(
            input_ids=ids.to(dev),
            attention_mask=mask.to(dev),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            logits_processor=None if greedy else LogitsProcessorList([ExponentialSampler(temperature, top_p, gen)]),
            pad_token_id=pad_id(adapter.tokenizer),
        )
    new = out[:, ids.shape[1]:]
    return [adapter.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]


def run_generation(
    adapter: ModelAdapter,
    jobs: list[dict],
    prompt_of: Callable[[dict], str],
    done: Callable[[dict], bool],
    save: Callable[[list[dict]], None],
    cfg: SamplingConfig,
    description: str = "generate",
    cluster=None,
    steering: Sequence | None = None,
    annotate: Callable[[list[dict]], list[dict]] | None = None,
    engine=None,
) -> int:
    """Generate an `answer` for each job not yet done, batch by batch, saving each batch at once.

    Each batch's seed derives from `cfg.seed` and the batch's first job, so a resumed run samples
    the same answers as an uninterrupted one. `annotate` sees every row of a freshly generated batch
    (in batch order) before saving, e.g. to add what a hook recorded. Returns the number generated now.
    With a `cluster` (cluster.RayCluster) the same batches run on its actors, under `steering` specs
    (no `annotate` there). With an `engine` (personascope.engines) the answers come from it, in its own
    chunks (no hooks: steering and `annotate` need the in-process path).
    """
    if cluster is not None:
        return cluster.generate(jobs, prompt_of, done, save, cfg, description, steering)
    if engine is not None:
        if steering or annotate is not None:
            raise ValueError("an engine generates without hooks: steered or guarded generation runs in-process")
        return _run_on_engine(engine, jobs, prompt_of, done, save, cfg, description)
    # fixed batches over all jobs (sorted by prompt length so they pad little): a resumed run
    # meets the same batches with the same seeds, so it samples the same answers
    ordered = sorted(jobs, key=lambda j: len(prompt_of(j)))
    made = 0
    with progress_bar() as bar:
        task = bar.add_task(description, total=len(jobs), rate="")
        for batch in _chunks(ordered, cfg.batch_size):
            missing = [j for j in batch if not done(j)]
            if not missing:
                bar.update(task, advance=len(batch))
                continue
            prompts = [prompt_of(j) for j in batch]
            answers = generate_batch(adapter, prompts, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                                     batch_seed(cfg, prompts, batch))
            rows = [{**j, "answer": a} for j, a in zip(batch, answers, strict=True)]
            if annotate is not None:
                rows = annotate(rows)
            save([r for j, r in zip(batch, rows, strict=True) if not done(j)])
            made += len(missing)
            elapsed = bar.elapsed(task) or 1e-9
            bar.update(task, advance=len(batch), rate=f"{made / elapsed:.2f} answers/s")
    return made


def batch_seed(cfg: SamplingConfig, prompts: list[str], batch: list[dict]) -> int:
    """The sampling seed of one batch: from `cfg.seed` and the batch's first job (the same wherever it runs)."""
    return cfg.seed * 1_000_003 + _stable_hash(prompts[0] + str(batch[0].get("sample", 0)))


def _chunks(items: list, n: int) -> Iterable[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _stable_hash(text: str) -> int:
    h = 0
    for ch in text.encode():
        h = (h * 131 + ch) % 2_147_483_647
    return h


def job_seed(seed: int, prompt: str, sample: int, job_id: object = None) -> int:
    """The sampling seed of one job on an engine: from the run's seed, the prompt, the sample index and the job's
    id (its `question`; jobs asking the same prompt under different ids, e.g. a cycled question, differ)."""
    h = 0
    for ch in (prompt + str(sample) + ("" if job_id is None else f"#{job_id}")).encode():
        h = (h * 131 + ch) % 2_147_483_647
    return seed * 1_000_003 + h


def _run_on_engine(
    engine,
    jobs: list[dict],
    prompt_of: Callable[[dict], str],
    done: Callable[[dict], bool],
    save: Callable[[list[dict]], None],
    cfg: SamplingConfig,
    description: str,
) -> int:
    """`run_generation` on an engine (personascope.engines): jobs sorted by prompt length in fixed chunks of
    `engine.chunk_size`. An engine that seeds each prompt on its own (vLLM) generates only the missing jobs;
    one that seeds a batch (HF) regenerates the whole chunk so a resumed run samples what an uninterrupted one
    would."""
    ordered = sorted(jobs, key=lambda j: len(prompt_of(j)))
    per_prompt = bool(getattr(engine, "seeds_per_prompt", False))
    made = 0
    with progress_bar() as bar:
        task = bar.add_task(f"{description} [{engine.name}]", total=len(jobs), rate="")
        for chunk in _chunks(ordered, engine.chunk_size(cfg)):
            missing = [j for j in chunk if not done(j)]
            if not missing:
                bar.update(task, advance=len(chunk))
                continue
            todo = missing if per_prompt else chunk
            prompts = [prompt_of(j) for j in todo]
            seeds = [job_seed(cfg.seed, p, j.get("sample", 0), j.get("question"))
                     for p, j in zip(prompts, todo, strict=True)]
            answers = engine.generate(prompts, cfg, seeds)
            save([{**j, "answer": a} for j, a in zip(todo, answers, strict=True) if not done(j)])
            made += len(missing)
            elapsed = bar.elapsed(task) or 1e-9
            bar.update(task, advance=len(chunk), rate=f"{made / elapsed:.2f} answers/s")
    return made
