"""The per-row work of screening, generation, judging and activation extraction, run on Ray actors.

Each `*_job` runs on an actor (`fn(worker, *args)`, see cluster.py) and calls the same function the
single-process path calls, on the same batches, so the results are identical; each `*_on_cluster`
is the driver side: it cuts the work into those batches, skips what is already on disk, and writes
the results through the caller's store (the driver is the only writer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch

from personascope.model import SamplingConfig, batch_seed, generate_batch
from personascope.util import progress_bar

if TYPE_CHECKING:
    from personascope.model import ModelAdapter


class Worker(Protocol):
    """What a job needs of the actor it runs on (`pool.Worker`): the loaded model and, if any, its judge."""

    adapter: ModelAdapter
    judge: Any


class RayCluster(Protocol):
    """What the drivers below need of the pool (`pool.RayCluster`): put shared objects, map jobs over actors."""

    def put(self, value: Any) -> Any:
        ...

    def map(self, fn: Callable, tasks: Iterable, ordered: bool = False) -> Iterator:
        ...

# ---------------------------------------------------------------- generation


def generate_job(worker: Worker, prompts: list[str], max_new_tokens: int, temperature: float, top_p: float,
                 seed: int, steering: Sequence | None) -> list[str]:
    """One generation batch on an actor, under the caller's steering specs (if any)."""
    if not steering:
        return generate_batch(worker.adapter, prompts, max_new_tokens, temperature, top_p, seed)
    from personascope.steering import Steerer

    steerer = Steerer(worker.adapter)
    for s in steering:
        steerer.add(s.vector, s.layer, s.coef, s.positions, s.mode)
    with steerer:
        return generate_batch(worker.adapter, prompts, max_new_tokens, temperature, top_p, seed)


def generate_on_cluster(cluster: RayCluster, jobs: list[dict], prompt_of: Callable[[dict], str],
                        done: Callable[[dict], bool], save: Callable[[list[dict]], None], cfg: SamplingConfig,
                        description: str = "generate", steering: Sequence | None = None) -> int:
    """`run_generation` on the actors: the same batches with the same seeds, each saved when it returns."""
    ordered = sorted(jobs, key=lambda j: len(prompt_of(j)))
    batches = [ordered[i : i + cfg.batch_size] for i in range(0, len(ordered), cfg.batch_size)]
    steering_ref = cluster.put(list(steering)) if steering else None
    made = 0
    with progress_bar() as bar:
        task = bar.add_task(description, total=len(jobs), rate="")

        def tasks() -> Iterator[tuple[int, tuple]]:
            for i, batch in enumerate(batches):
                if all(done(j) for j in batch):
                    bar.update(task, advance=len(batch))
                    continue
                prompts = [prompt_of(j) for j in batch]
                yield i, (prompts, cfg.max_new_tokens, cfg.temperature, cfg.top_p, batch_seed(cfg, prompts, batch),
                          steering_ref)

        for i, answers in cluster.map(generate_job, tasks()):
            batch = batches[i]
            missing = [{**j, "answer": a} for j, a in zip(batch, answers, strict=True) if not done(j)]
            save(missing)
            made += len(missing)
            elapsed = bar.elapsed(task) or 1e-9
            bar.update(task, advance=len(batch), rate=f"{made / elapsed:.2f} answers/s")
    return made


# ---------------------------------------------------------------- judging


def score_job(worker: Worker, requests: list) -> list[float | None]:
    """One judging batch on an actor's local judge."""
    return worker.judge.score(requests)


def score_on_cluster(cluster: RayCluster, judge, todo: list[tuple[str, object]], batch_size: int,
                     save: Callable[[list[tuple[str, object]], list], None], description: str = "judge") -> None:
    """The judge's batches of `judge_answers` on the actors; `save(batch, scores)` as each returns."""
    batches = [todo[s : s + batch_size] for s in range(0, len(todo), batch_size)]
    with progress_bar() as bar:
        task = bar.add_task(description, total=len(todo), rate="")
        done = 0
        for i, scores in cluster.map(score_job, ((i, ([r for _, r in b],)) for i, b in enumerate(batches))):
            save(batches[i], scores)
            done += len(batches[i])
            elapsed = bar.elapsed(task) or 1e-9
            bar.update(task, advance=len(batches[i]), rate=f"{done / elapsed:.2f} scores/s")


# ---------------------------------------------------------------- activations


def span_sums_job(worker: Worker, items: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """Per-span sums (float64) over one batch of items at every layer, and the summed residual norm."""
    from personascope.model import SPANS, iter_span_batches

    out: dict[str, torch.Tensor] = {}
    for b in iter_span_batches(worker.adapter, items, batch_size=len(items), sort_by_length=False):
        out = {s: b.spans[s].double().sum(0) for s in SPANS}
        out["resid_norm"] = b.resid_norm.double().sum(0)
    return out


def span_sums_on_cluster(cluster: RayCluster, items: list[tuple[list[int], list[int]]], batch_size: int
                         ) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """(batch indices, span sums) in the batch order `iter_span_batches` uses, so sums add up in the same order."""
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]) + len(items[i][1]))
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    tasks = ((k, ([items[i] for i in idx],)) for k, idx in enumerate(batches))
    for k, sums in cluster.map(span_sums_job, tasks, ordered=True):
        yield batches[k], sums


# ---------------------------------------------------------------- screening


class MemoryAnswerCache:
    """The AnswerCache interface over a dict (an actor's view): answers the driver had, plus new ones."""

    def __init__(self, answers: dict[str, str]):
        self.answers = dict(answers)
        self.new: list[tuple[str, str]] = []

    @staticmethod
    def key(prompt_text: str) -> str:
        from personascope.screen import AnswerCache

        return AnswerCache.key(prompt_text)

    def __contains__(self, key: str) -> bool:
        return key in self.answers

    def get(self, key: str) -> str:
        return self.answers[key]

    def put(self, pairs: list[tuple[str, str]]) -> None:
        self.answers.update(pairs)
        self.new += pairs


def screen_chunk_job(worker: Worker, chunk: list, shared: tuple, cached: dict[str, str]
                     ) -> tuple[list[dict], list[tuple[str, str]]]:
    """ΔP records of one chunk on an actor, and the model answers it generated (for the driver's cache)."""
    from personascope.screen import process_chunk

    dirs, cfg = shared
    cache = MemoryAnswerCache(cached) if cfg.method == "generate" else None
    recs = process_chunk(worker.adapter, chunk, dirs, cfg, cache)
    return recs, (cache.new if cache is not None else [])


def screen_on_cluster(cluster: RayCluster, adapter, chunks: Iterable[list], dirs: dict, cfg, cache=None,
                      judge_rows: Callable[[list], dict[int, dict]] | None = None) -> Iterator[list[dict]]:
    """The records of each chunk, in file order, computed on the actors; new model answers go to `cache`.

    `judge_rows(rows)` (driver side) returns judge scores by line, merged in as the local path does.
    """
    from personascope.screen import BadRow

    shared = cluster.put((dirs, cfg))
    waiting: dict[int, list] = {}

    def tasks() -> Iterator[tuple[int, tuple]]:
        for no, chunk in enumerate(chunks):
            cached: dict[str, str] = {}
            if cache is not None:
                for r in chunk:
                    if isinstance(r, BadRow):
                        continue
                    try:
                        k = cache.key(adapter.render(r.messages))
                    except Exception:  # the actor reports the template error
                        continue
                    if k in cache:
                        cached[k] = cache.get(k)
            if judge_rows is not None:
                waiting[no] = chunk
            yield no, (chunk, shared, cached)

    for no, (recs, new) in cluster.map(screen_chunk_job, tasks(), ordered=True):
        if cache is not None and new:
            cache.put([(k, a) for k, a in dict(new).items() if k not in cache])
        if judge_rows is not None:
            chunk = waiting.pop(no)
            good = [r for r, rec in zip(chunk, recs, strict=True) if "error" not in rec]
            scores = judge_rows(good) if good else {}
            for rec in recs:
                if rec["line"] in scores:
                    rec["judge"] = scores[rec["line"]]
        yield recs
