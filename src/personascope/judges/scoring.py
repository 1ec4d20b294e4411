"""Judge answers for trait and coherence with an on-disk score cache (never re-judge an answer)."""

from __future__ import annotations

from pathlib import Path

from personascope.traits import Trait
from personascope.util import JsonlStore, progress_bar

from .local import Judge, JudgeRequest


class ScoreCache(JsonlStore):
    """scores.jsonl: one record per (judge, rubric, question, answer), appended as scores arrive."""

    def __init__(self, path: Path):
        super().__init__(path, ("judge", "rubric", "question", "answer"))


def judged_question(rec: dict) -> str:
    """The question a record's answer is judged against (`judge_question`, else `question_text`)."""
    return rec.get("judge_question") or rec["question_text"]


def judge_answers(
    judge: Judge,
    trait: Trait,
    records: list[dict],
    cache: ScoreCache,
    batch_size: int = 8,
    kinds: tuple[str, ...] = ("trait", "coherence"),
    description: str = "judge",
    cluster=None,
) -> list[dict]:
    """Return records with `trait_score` / `coherence` (None when missing), `refusal`, and the judge's name and modes.

    With a `cluster` started with a judge (cluster.RayCluster), the batches are scored on its actors. A record's
    `judge_question` (default its `question_text`) is the question the judge sees: e.g. without a formatting
    suffix such as "Answer in a few sentences.", which is not part of what the answer is judged against.
    """
    todo: list[tuple[str, JudgeRequest]] = []
    seen: set[tuple] = set()
    for rec in records:
        for kind in kinds:
            req = JudgeRequest(kind, judged_question(rec), rec["answer"], trait)
            key = (judge.name, judge.rubric_key(req), req.question, req.answer)
            if key not in cache and key not in seen:
                seen.add(key)
                todo.append((judge.rubric_key(req), req))

    def save(chunk: list[tuple[str, JudgeRequest]], scores: list) -> None:
        refused = judge.refusals([r for _, r in chunk])
        cache.append({"judge": judge.name, "rubric": rk, "kind": r.kind, "mode": judge.resolve_mode(r),
                      "question": r.question, "answer": r.answer, "score": s, "refusal": refusal}
                     for (rk, r), s, refusal in zip(chunk, scores, refused, strict=True))

    if cluster is not None and getattr(cluster, "judge", None) is not None:
        cluster.score(judge, todo, batch_size, save, description)
        todo = []
    with progress_bar() as bar:
        task = bar.add_task(description, total=len(todo), rate="")
        done = 0
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            save(chunk, judge.score([r for _, r in chunk]))
            done += len(chunk)
            elapsed = bar.elapsed(task) or 1e-9
            bar.update(task, advance=len(chunk), rate=f"{done / elapsed:.2f} scores/s")
    out = []
    for rec in records:
        new = dict(rec, judge=judge.name)
        for kind, field in (("trait", "trait_score"), ("coherence", "coherence")):
            if kind in kinds:
                req = JudgeRequest(kind, judged_question(rec), rec["answer"], trait)
                hit = cache.get((judge.name, judge.rubric_key(req), req.question, req.answer))
                new[field] = hit["score"] if hit else None
                new[f"{field}_mode"] = judge.resolve_mode(req)
                if kind == "trait":
                    new["refusal"] = bool(hit and hit.get("refusal"))
        out.append(new)
    return out
