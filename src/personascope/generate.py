"""Batched sampling of answers (left padding, attention masks), written to JSONL as batches finish."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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


def progress_bar(**kw) -> Progress:
    """The rich progress bar used by every long stage."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), transient=False, **kw)


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
    if seed is not None:
        torch.manual_seed(seed)
    greedy = temperature <= 0
    out = adapter.model.generate(
        input_ids=ids.to(dev),
        attention_mask=mask.to(dev),
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        temperature=None if greedy else temperature,
        top_p=None if greedy else top_p,
        top_k=None,
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
    engine=None,
) -> int:
    """Generate an `answer` for each job not yet done, batch by batch, saving each batch at once.

    Each batch's seed derives from `cfg.seed` and the batch's first job, so a resumed run samples
    the same answers as an uninterrupted one. Returns the number of answers generated now.
    With an `engine` (personascope.engines) the answers come from it, in its own chunks.
    """
    if engine is not None:
        from .engines.jobs import run_engine_generation

        return run_engine_generation(engine, jobs, prompt_of, done, save, cfg, description)
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
            seed = cfg.seed * 1_000_003 + _stable_hash(prompts[0] + str(batch[0].get("sample", 0)))
            answers = generate_batch(adapter, prompts, cfg.max_new_tokens, cfg.temperature, cfg.top_p, seed)
            save([{**j, "answer": a} for j, a in zip(batch, answers, strict=True) if not done(j)])
            made += len(missing)
            elapsed = bar.tasks[task].elapsed or 1e-9
            bar.update(task, advance=len(batch), rate=f"{made / elapsed:.2f} answers/s")
    return made


def _chunks(items: list, n: int) -> Iterable[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _stable_hash(text: str) -> int:
    h = 0
    for ch in text.encode():
        h = (h * 131 + ch) % 2_147_483_647
    return h
