"""Resumable answer generation through an Engine: fixed chunks, a seed per job, each chunk saved at once."""

from __future__ import annotations

from collections.abc import Callable

from . import Engine


def job_seed(seed: int, prompt: str, sample: int) -> int:
    """The sampling seed of one job: from the run's seed, the prompt and the sample index (stable)."""
    h = 0
    for ch in (prompt + str(sample)).encode():
        h = (h * 131 + ch) % 2_147_483_647
    return seed * 1_000_003 + h


def work_tokens(n_prompts: int, prompt_tokens: int, new_tokens: int = 0) -> int:
    """A job's size for `--engine auto`: a generated token costs about four prompt tokens."""
    return n_prompts * (prompt_tokens + 4 * new_tokens)


def run_engine_generation(
    engine: Engine,
    jobs: list[dict],
    prompt_of: Callable[[dict], str],
    done: Callable[[dict], bool],
    save: Callable[[list[dict]], None],
    cfg,
    description: str = "generate",
) -> int:
    """`run_generation` on an engine: jobs sorted by prompt length in fixed chunks of `engine.chunk_size`.

    An engine that seeds each prompt on its own (vLLM) generates only the missing jobs; one that seeds a
    batch (HF) regenerates the whole chunk so a resumed run samples what an uninterrupted one would.
    """
    from ..generate import _chunks, progress_bar

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
            seeds = [job_seed(cfg.seed, p, j.get("sample", 0)) for p, j in zip(prompts, todo, strict=True)]
            answers = engine.generate(prompts, cfg, seeds)
            save([{**j, "answer": a} for j, a in zip(todo, answers, strict=True) if not done(j)])
            made += len(missing)
            elapsed = bar.tasks[task].elapsed or 1e-9
            bar.update(task, advance=len(chunk), rate=f"{made / elapsed:.2f} answers/s")
    return made
