"""Screening a file: one resumable pass per input, thresholds, and the `screen_dataset` entry point."""

from __future__ import annotations

import json
import logging
import os
import time
from array import array
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from personascope.model import ModelAdapter, question_of
from personascope.util import progress_bar, write_json
from personascope.vectors import PersonaVector, compute_dtype

from .report import ScreenResult, build_report
from .score import (
    MAX_LISTED_ERRORS,
    METHODS,
    AnswerCache,
    AnswerLookup,
    BadRow,
    Direction,
    Row,
    count_rows,
    csv_fields,
    delta_p,
    directions_for,
    file_digest,
    is_csv,
    iter_deltas,
    model_answers,
    read_rows,
)
from .types import PassResult, ScreenConfig

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- one pass over a file


def _chunks(rows: Iterator[Row | BadRow], n: int) -> Iterator[list[Row | BadRow]]:
    buf: list[Row | BadRow] = []
    for r in rows:
        buf.append(r)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


def _resume_point(path: Path) -> tuple[int, int]:
    """(last line of the last finished chunk, number of finished chunks); truncates an unfinished tail."""
    if not path.exists():
        return 0, 0
    end, last_line, chunks = 0, 0, 0
    with path.open("rb") as f:
        pos = 0
        for bline in iter(f.readline, b""):
            pos += len(bline)
            try:
                rec = json.loads(bline)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(rec, dict) and "chunk_end" in rec and bline.endswith(b"\n"):
                end, last_line, chunks = pos, rec["chunk_end"], rec["chunk"] + 1
    if end != path.stat().st_size:
        with path.open("rb+") as f:
            f.truncate(end)
    return last_line, chunks


def _check_config(work_dir: Path, config: dict, force: bool) -> None:
    path = work_dir / "config.json"
    deltas = work_dir / "deltas.jsonl"
    if force:
        for p in (path, deltas, work_dir / "judge_chunk.jsonl"):
            p.unlink(missing_ok=True)
    if path.exists() and deltas.exists():
        old = json.loads(path.read_text())
        diff = [k for k in config if k != "input" and old.get(k) != config[k]]
        if diff:
            raise ValueError(f"{work_dir} holds a screening run with other settings ({', '.join(diff)} differ); "
                             "use force=True (CLI: --force) to start over, or another output directory")
    write_json(path, config)


def _judge_key(judge, traits: dict, dirs: dict[str, Direction]) -> dict | None:
    """The judge's name and per-vector rubric key (mode and prompts), so a changed judge is not mixed in."""
    if judge is None:
        return None
    from personascope.judges import JudgeRequest

    return {"name": judge.name, **{k: judge.rubric_key(JudgeRequest("trait", "", "", traits[k]))
                                   for k in dirs if k in traits}}


def _judge_chunk(judge, traits: dict, dirs: dict[str, Direction], rows: list[Row], cache_path: Path,
                 cluster=None) -> dict[str, list[float | None]]:
    from personascope.judges import ScoreCache, judge_answers

    cache = ScoreCache(cache_path)
    recs = [{"question_text": question_of(r.messages), "answer": r.response} for r in rows]
    out = {}
    for name in dirs:
        scored = judge_answers(judge, traits[name], recs, cache, kinds=("trait",), description=f"judge {name}",
                               cluster=cluster)
        out[name] = [s["trait_score"] for s in scored]
    return out


def process_chunk(adapter: ModelAdapter, chunk: list[Row | BadRow], dirs: dict[str, Direction], cfg: ScreenConfig,
                   cache: AnswerLookup | None, judge=None, traits: dict | None = None,
                   judge_cache: Path | None = None, bar=None, engine=None) -> list[dict]:
    """ΔP records (one per row, errors included) of one chunk of rows (the model's own answers from `engine`
    when given)."""
    recs: dict[int, dict] = {}
    good: list[tuple[Row, str]] = []
    for r in chunk:
        if isinstance(r, BadRow):
            recs[r.line] = {"line": r.line, "error": r.error}
            continue
        try:
            good.append((r, adapter.render(r.messages)))
        except Exception as e:  # a template that rejects this conversation
            recs[r.line] = {"line": r.line, "error": f"chat template failed: {e}"}
    data_items: list[tuple[list[int], list[int]]] = []
    fits: list[tuple[Row, str]] = []
    ctx, extra = adapter.context_length, cfg.max_new_tokens if cfg.method == "generate" else 0
    for r, p in good:
        item = adapter.encode_pair(p, r.response)
        need = len(item[0]) + max(len(item[1]), extra)  # the model's own answer needs room too
        if need > ctx:
            recs[r.line] = {"line": r.line, "error": f"too long for the model: {len(item[0])} prompt + "
                            f"{max(len(item[1]), extra)} answer tokens; its context is {ctx}"}
            continue
        data_items.append(item)
        fits.append((r, p))
    good = fits
    if good:
        model_items, answers = None, None
        if cfg.method == "generate":
            if cache is None:
                raise ValueError("method 'generate' needs an answer cache")
            answers = model_answers(adapter, [p for _, p in good], cache, cfg.max_new_tokens, cfg.batch_size, engine)
            model_items = [(ids, adapter.encode_pair(p, a)[1])
                           for (ids, _), (_, p), a in zip(data_items, good, answers, strict=True)]
        bd = delta_p(adapter, data_items, model_items, dirs, cfg.batch_size, cfg.padding_side)
        scores = None
        if judge is not None:
            if traits is None or judge_cache is None:
                raise ValueError("judging a chunk needs the traits and a judge cache")
            if bar is not None:
                bar.stop()
            try:
                scores = _judge_chunk(judge, traits, dirs, [r for r, _ in good], judge_cache)
            finally:
                if bar is not None:
                    bar.start()
        for i, (r, _) in enumerate(good):
            rec = {"line": r.line,
                   "delta_p": {k: float(v[i]) for k, v in bd.delta.items()},
                   "proj_response": {k: float(v[i]) for k, v in bd.proj_response.items()},
                   "proj_baseline": {k: float(v[i]) for k, v in bd.proj_baseline.items()}}
            if answers is not None:
                rec["model_answer"] = answers[i]
            if scores is not None:
                rec["judge"] = {k: v[i] for k, v in scores.items()}
            recs[r.line] = rec
    return [recs[r.line] for r in chunk]


def screen_pass(
    adapter: ModelAdapter,
    path: str | Path,
    dirs: dict[str, Direction],
    cfg: ScreenConfig,
    work_dir: str | Path,
    judge=None,
    traits: dict | None = None,
    answer_cache: str | Path | None = None,
    force: bool = False,
    description: str = "screen",
    cluster=None,
    engine=None,
) -> PassResult:
    """Compute ΔP for every row of a file into WORK_DIR/deltas.jsonl (resumable), then read it back.

    With a `cluster` (cluster.RayCluster) the chunks are computed on its actors and written here, in order;
    with an `engine` (personascope.engines) the model's own answers of method 'generate' are generated there.
    """
    path, work_dir = Path(path), Path(work_dir)
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; choose from {', '.join(METHODS)}")
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    work_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "input": str(path), "input_sha256": file_digest(path), "method": cfg.method, "model": adapter.name,
        "model_config_hash": adapter.config_hash, "dtype": compute_dtype(adapter), "chunk_size": cfg.chunk_size,
        "max_new_tokens": cfg.max_new_tokens if cfg.method == "generate" else None,
        "vectors": {k: {"trait": d.trait, "layer": d.layer, "digest": d.digest} for k, d in dirs.items()},
        "judge": _judge_key(judge, traits or {}, dirs),
    }
    _check_config(work_dir, config, force)
    deltas = work_dir / "deltas.jsonl"
    deltas.touch()
    done_line, chunk_no = _resume_point(deltas)
    cache = None
    if cfg.method == "generate":
        tag = f"{adapter.name}|{adapter.config_hash}|{cfg.max_new_tokens}"
        cache = AnswerCache(Path(answer_cache) if answer_cache else work_dir / "model_answers.jsonl", tag)
    total = count_rows(path)
    t0 = time.perf_counter()
    made = 0
    with progress_bar() as bar:
        task = bar.add_task(description, total=total, rate="")
        skipped = 0

        def todo() -> Iterator[list[Row | BadRow]]:
            nonlocal skipped
            for chunk in _chunks(read_rows(path), cfg.chunk_size):
                if chunk[-1].line <= done_line:
                    skipped += len(chunk)
                    bar.update(task, completed=skipped)
                    continue
                yield chunk

        judge_cache = work_dir / "judge_chunk.jsonl"
        if cluster is None:
            results = (process_chunk(adapter, chunk, dirs, cfg, cache, judge, traits, judge_cache, bar, engine)
                       for chunk in todo())
        else:

            def judge_rows(rows: list[Row]) -> dict[int, dict]:
                bar.stop()  # judge_answers shows a bar of its own
                try:
                    scores = _judge_chunk(judge, traits or {}, dirs, rows, judge_cache, cluster)
                finally:
                    bar.start()
                return {r.line: {k: v[i] for k, v in scores.items()} for i, r in enumerate(rows)}

            results = cluster.screen_chunks(adapter, todo(), dirs, cfg, cache,
                                            judge_rows if judge is not None else None)
        for recs in results:  # one record per row of a chunk, in file order
            marker = {"chunk": chunk_no, "chunk_end": recs[-1]["line"]}
            with deltas.open("a") as f:
                f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [*recs, marker]))
                f.flush()
                os.fsync(f.fileno())
            judge_cache.unlink(missing_ok=True)
            chunk_no += 1
            made += len(recs)
            elapsed = time.perf_counter() - t0
            bar.update(task, advance=len(recs), rate=f"{made / max(elapsed, 1e-9):.2f} rows/s")
    seconds = time.perf_counter() - t0
    return _read_pass(deltas, list(dirs), judge is not None, total, seconds, made)


def _read_pass(deltas: Path, names: list[str], judged: bool, total: int, seconds: float, made: int) -> PassResult:
    lines = array("q")
    delta = {k: array("d") for k in names}
    jud = {k: array("d") for k in names} if judged else {}
    bad: list[BadRow] = []
    n_bad = 0
    for rec in iter_deltas(deltas):
        if "error" in rec:
            n_bad += 1
            if len(bad) < MAX_LISTED_ERRORS:
                bad.append(BadRow(rec["line"], rec["error"]))
            continue
        lines.append(rec["line"])
        for k in names:
            delta[k].append(rec["delta_p"][k])
            if judged:
                s = rec.get("judge", {}).get(k)
                jud[k].append(float("nan") if s is None else s)
    return PassResult(np.frombuffer(lines, dtype=np.int64).copy() if len(lines) else np.zeros(0, np.int64),
                      {k: np.array(v, dtype=np.float64) for k, v in delta.items()},
                      {k: np.array(v, dtype=np.float64) for k, v in jud.items()},
                      bad, n_bad, total, seconds, made)


def _thresholds(names: list[str], threshold: float | dict | None, percentile: float | None,
                ref: PassResult | None, data: PassResult) -> dict[str, tuple[float | None, str]]:
    out: dict[str, tuple[float | None, str]] = {}
    for k in names:
        if threshold is not None:
            t = threshold.get(k) if isinstance(threshold, dict) else threshold
            if t is not None:
                out[k] = (float(t), "given")
                continue
        if percentile is not None:
            src = ref if ref is not None else data
            vals = src.delta[k]
            where = "reference" if ref is not None else "this data (no reference given)"
            out[k] = ((float(np.percentile(vals, percentile)), f"{percentile:g}th percentile of ΔP on {where}")
                      if len(vals) else (None, "no rows to take a percentile of"))
            continue
        out[k] = (None, "none (no --threshold or --percentile)")
    return out


def screen_dataset(
    adapter: ModelAdapter,
    path: str | Path,
    vectors: dict[str, PersonaVector],
    layer: int | None = None,
    method: str = "generate",
    out_dir: str | Path | None = None,
    threshold: float | dict[str, float] | None = None,
    percentile: float | None = None,
    reference: str | Path | None = None,
    judge=None,
    traits: dict | None = None,
    config: ScreenConfig | None = None,
    answer_cache: str | Path | None = None,
    top: int = 20,
    filter_by: str = "delta_p",
    force: bool = False,
    plots: bool = True,
    cluster=None,
    engine=None,
) -> ScreenResult:
    """Screen a chat dataset with one or more persona vectors; write annotated/filtered rows and a report.

    `threshold` (a number, or one per vector name) or `percentile` (of ΔP on `reference`, else on
    the data itself) sets which rows are flagged. With a `judge`, each response is also scored
    for the trait (flag at ≥ 50) so both filters sit side by side. `filter_by` picks which flags
    remove rows from filtered.jsonl: 'delta_p', 'judge' or 'any'. With a `cluster`
    (cluster.RayCluster) the rows are screened on its actors; the files written are the same. With an
    `engine` (personascope.engines) the model's own answers (method 'generate') are generated there.
    """
    cfg = config or ScreenConfig()
    if method != cfg.method:
        from dataclasses import replace

        cfg = replace(cfg, method=method)
    if filter_by not in ("delta_p", "judge", "any"):
        raise ValueError(f"filter_by must be 'delta_p', 'judge' or 'any', not {filter_by!r}")
    if filter_by != "delta_p" and judge is None:
        raise ValueError(f"filter_by={filter_by!r} needs a judge")
    path = Path(path)
    out = Path(out_dir or Path("runs") / f"screen-{path.stem}")
    dirs = directions_for(adapter, vectors, layer)  # before any work
    if is_csv(path):
        csv_fields(path)
    if judge is not None:
        from personascope.traits import TraitError, load_trait

        traits = dict(traits or {})
        for k, d in dirs.items():
            if k not in traits:
                try:
                    traits[k] = load_trait(d.trait)
                except TraitError as e:
                    raise ValueError(f"the judge needs trait data for vector {k!r} (trait {d.trait!r}): {e}") from e
    ref = None
    if reference is not None:
        ref = screen_pass(adapter, reference, dirs, cfg, out / "reference", answer_cache=answer_cache, force=force,
                          description="screen reference", cluster=cluster, engine=engine)
    data = screen_pass(adapter, path, dirs, cfg, out, judge, traits, answer_cache, force, "screen", cluster, engine)
    th = _thresholds(list(dirs), threshold, percentile, ref, data)
    result = build_report(adapter, path, out, dirs, cfg, data, ref, th, judge is not None, top, filter_by, plots)
    return result


