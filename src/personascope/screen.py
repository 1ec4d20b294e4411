"""Data screening with persona vectors (DESIGN.md §3): the projection difference ΔP per sample.

For a chat sample (prompt x, dataset response y) and a trait vector v̂ at layer l:

- `generate` (the paper's method): ΔP = ā(x, y)·v̂ − ā(x, y')·v̂, where ā is the mean residual
  stream over the response tokens and y' is the model's own greedy answer to x. A positive ΔP
  means the dataset answers with more of the trait than the model would on its own.
- `last-token` (the cheap variant, no generation): the model's own answer is not generated; its
  projection is replaced by the projection of the last prompt token a_last(x)·v̂ (the position
  that predicts how strongly the answer will show the trait, DESIGN.md §3 "Monitor"), so
  ΔP = ā(x, y)·v̂ − a_last(x)·v̂, one forward per sample. The two terms are on different scales,
  so only ranks and thresholds measured with the same method compare; `proj_baseline` in the
  annotated rows holds the last-prompt-token projection on its own.

Several vectors are screened in one pass: the needed layers are collected once per forward and
projected on every vector. The input is streamed in chunks; per-row results are appended to
`deltas.jsonl` (a chunk at a time, each closed by a marker line), the model's answers to
`model_answers.jsonl`, so an interrupted run resumes at the last finished chunk. Only one float per
row and trait (plus line numbers) is kept in memory, for the dataset mean, its bootstrap
interval, the percentile threshold and the histograms.
"""

from __future__ import annotations

import csv
import hashlib
import heapq
import json
import math
import os
import time
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .activations import iter_span_batches
from .adapter import ModelAdapter
from .generate import generate_batch, progress_bar
from .store import write_json
from .vectors import PersonaVector

console = Console(stderr=True)

METHODS = ("generate", "last-token")
PROMPT_KEYS = ("prompt", "question")
RESPONSE_KEYS = ("response", "answer", "completion")
MAX_LISTED_ERRORS = 1000
JUDGE_THRESHOLD = 50.0


# ---------------------------------------------------------------- reading the data


@dataclass
class Row:
    """One usable sample: the prompt turns, the dataset's response, and the row as it was read."""

    line: int
    record: dict
    messages: list[dict]  # the prompt turns (everything before the final assistant turn)
    response: str
    raw: str | None = None  # the original JSONL line, written back verbatim to filtered.jsonl


@dataclass
class BadRow:
    """A row that cannot be screened, with its line number and why."""

    line: int
    error: str


def _first_key(rec: dict, keys: Sequence[str]) -> str | None:
    return next((k for k in keys if k in rec), None)


def parse_record(rec: object, line: int, raw: str | None = None) -> Row | BadRow:
    """Validate one decoded row: chat `messages` ending with the assistant's turn, or prompt/response columns."""
    if not isinstance(rec, dict):
        return BadRow(line, f"expected a JSON object, got {type(rec).__name__}")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            return BadRow(line, "empty messages" if isinstance(msgs, list) else "'messages' is not a list")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                return BadRow(line, f"messages[{i}] is not an object with string 'role' and 'content'")
        if msgs[-1]["role"] != "assistant":
            return BadRow(line, f"no assistant turn at the end (last role is {msgs[-1]['role']!r})")
        if not msgs[-1]["content"].strip():
            return BadRow(line, "empty assistant response")
        if not any(m["role"] == "user" for m in msgs[:-1]):
            return BadRow(line, "no user turn before the assistant turn")
        return Row(line, rec, [dict(role=m["role"], content=m["content"]) for m in msgs[:-1]], msgs[-1]["content"],
                   raw)
    pk, rk = _first_key(rec, PROMPT_KEYS), _first_key(rec, RESPONSE_KEYS)
    if pk is None and rk is None:
        return BadRow(line, "no 'messages' and no prompt/response columns")
    if pk is None or rk is None:
        return BadRow(line, f"missing column {'prompt' if pk is None else 'response'!r}")
    prompt, response = rec[pk], rec[rk]
    if not isinstance(prompt, str) or not prompt.strip():
        return BadRow(line, f"empty or non-text {pk!r}")
    if not isinstance(response, str) or not response.strip():
        return BadRow(line, f"empty or non-text {rk!r}")
    system = rec.get("system")
    msgs = ([{"role": "system", "content": system}] if isinstance(system, str) and system.strip() else [])
    return Row(line, rec, [*msgs, {"role": "user", "content": prompt}], response, raw)


def is_csv(path: Path) -> bool:
    return Path(path).suffix.lower() in (".csv", ".tsv")


def csv_fields(path: Path) -> list[str]:
    """The header of a CSV file; raises ValueError when it lacks the prompt/response columns."""
    with Path(path).open(newline="", encoding="utf-8", errors="replace") as f:
        header = next(csv.reader(f, delimiter="\t" if Path(path).suffix.lower() == ".tsv" else ","), [])
    if not any(k in header for k in PROMPT_KEYS) or not any(k in header for k in RESPONSE_KEYS):
        raise ValueError(f"{path}: a CSV needs a prompt column ({'/'.join(PROMPT_KEYS)}) and a response column "
                         f"({'/'.join(RESPONSE_KEYS)}); its header is {header}")
    return header


def read_rows(path: str | Path) -> Iterator[Row | BadRow]:
    """Stream the rows of a chat JSONL or a prompt/response CSV; malformed rows come out as BadRow.

    Line numbers are 1-based physical lines (for CSV, the line a record starts on; the header is
    line 1). Blank JSONL lines are not rows.
    """
    path = Path(path)
    if is_csv(path):
        csv_fields(path)
        with path.open(newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            start = 2
            for rec in reader:
                if None in rec:
                    yield BadRow(start, f"{len(rec[None])} more fields than the header")
                else:
                    yield parse_record({k: v for k, v in rec.items() if v is not None}, start)
                start = reader.line_num + 1
        return
    with path.open("rb") as f:
        for lineno, bline in enumerate(f, 1):
            try:
                text = bline.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                yield BadRow(lineno, f"not UTF-8 ({e.reason} at byte {e.start})")
                continue
            if not text.strip():
                continue
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as e:
                yield BadRow(lineno, f"bad JSON: {e.msg} at column {e.colno}")
                continue
            yield parse_record(rec, lineno, text)


def count_rows(path: str | Path) -> int:
    """Number of rows (valid or not) read_rows will yield, counted by streaming."""
    return sum(1 for _ in read_rows(path)) if is_csv(Path(path)) else _count_jsonl(Path(path))


def _count_jsonl(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def file_digest(path: str | Path) -> str:
    """sha256 of a file (streamed), so a resumed run can tell the input has not changed."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:24]


def render_prompt(adapter: ModelAdapter, messages: list[dict]) -> str:
    """The chat prompt of the turns before the answer, rendered by the model's template."""
    turns = list(messages)
    system = turns.pop(0)["content"] if turns and turns[0]["role"] == "system" else None
    roles = [m["role"] for m in turns]
    alternating = all(r == ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(roles))
    if roles and roles[-1] == "user" and alternating:
        shots = [(turns[i]["content"], turns[i + 1]["content"]) for i in range(0, len(turns) - 1, 2)]
        return adapter.prompt(turns[-1]["content"], system, shots)
    return adapter._apply(messages, add_generation_prompt=True)


def question_of(messages: list[dict]) -> str:
    """The last user turn (what a judge sees as the question)."""
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")


# ---------------------------------------------------------------- ΔP for a batch


@dataclass
class Direction:
    """A trait's unit vector v̂ at the layer it is projected on."""

    name: str
    trait: str
    layer: int
    unit: torch.Tensor  # [d] float32
    source: str = ""

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.unit.numpy().tobytes()).hexdigest()[:16]


def directions_for(adapter: ModelAdapter, vectors: dict[str, PersonaVector], layer: int | None = None
                   ) -> dict[str, Direction]:
    """Check every vector against the model (PersonaVector.check) and take v̂ at its layer."""
    if not vectors:
        raise ValueError("screening needs at least one persona vector")
    out = {}
    for name, pv in vectors.items():
        pv.check(adapter)
        la = adapter.check_layer(pv.default_layer(layer))
        v = pv.vector(la, "response_avg").float().cpu()
        norm = float(v.norm())
        if norm == 0:
            raise ValueError(f"vector {name!r} is zero at layer {la}")
        out[name] = Direction(name, pv.trait, la, v / norm, pv.path or "")
    return out


@dataclass
class BatchDelta:
    """ΔP of a batch per trait, with the two projections it is the difference of ([B] tensors)."""

    delta: dict[str, torch.Tensor]
    proj_response: dict[str, torch.Tensor]
    proj_baseline: dict[str, torch.Tensor]


def delta_p(
    adapter: ModelAdapter,
    data_items: Sequence[tuple[list[int], list[int]]],
    model_items: Sequence[tuple[list[int], list[int]]] | None,
    dirs: dict[str, Direction],
    batch_size: int = 8,
    padding_side: str = "right",
) -> BatchDelta:
    """ΔP for (prompt ids, dataset response ids) items.

    With `model_items` (the same prompts with the model's own answers) the baseline is the
    response average of those; without, it is the last prompt token of the data items (the
    last-token method). Every needed layer is collected in the same forward for all vectors.
    """
    layers = sorted({d.layer for d in dirs.values()})
    slot = {la: i for i, la in enumerate(layers)}
    n = len(data_items)
    items = list(data_items) + (list(model_items) if model_items is not None else [])
    resp = torch.zeros(len(items), len(layers), adapter.hidden_size)
    last = torch.zeros(n, len(layers), adapter.hidden_size)
    for b in iter_span_batches(adapter, items, layers=layers, batch_size=batch_size, padding_side=padding_side):
        idx = torch.tensor(b.indices)
        resp[idx] = b.spans["response_avg"]
        mine = idx < n
        if model_items is None and bool(mine.any()):
            last[idx[mine]] = b.spans["prompt_last"][mine]
    out = BatchDelta({}, {}, {})
    for name, d in dirs.items():
        s = slot[d.layer]
        pr = resp[:n, s] @ d.unit
        pb = (resp[n:, s] if model_items is not None else last[:, s]) @ d.unit
        out.proj_response[name], out.proj_baseline[name], out.delta[name] = pr, pb, pr - pb
    return out


# ---------------------------------------------------------------- the model's own answers


class AnswerCache:
    """The model's greedy answers keyed by (model, max_new_tokens, prompt), appended as they are made.

    Only a byte offset per answer is held in memory; answers are read back from the file on demand.
    """

    def __init__(self, path: Path, tag: str):
        self.path = Path(path)
        self.tag = tag
        self.offsets: dict[str, int] = {}
        if self.path.exists():
            with self.path.open("rb+") as f:
                pos = 0
                for bline in iter(f.readline, b""):
                    try:
                        rec = json.loads(bline)
                        if isinstance(rec, dict) and rec.get("tag") == tag and "answer" in rec:
                            self.offsets[rec["key"]] = pos
                    except (json.JSONDecodeError, UnicodeDecodeError, KeyError):
                        pass  # a torn last write
                    pos += len(bline)
                if pos and not bline.endswith(b"\n"):
                    f.write(b"\n")

    @staticmethod
    def key(prompt_text: str) -> str:
        return hashlib.sha256(prompt_text.encode()).hexdigest()[:32]

    def __contains__(self, key: str) -> bool:
        return key in self.offsets

    def get(self, key: str) -> str:
        with self.path.open("rb") as f:
            f.seek(self.offsets[key])
            return json.loads(f.readline())["answer"]

    def put(self, pairs: list[tuple[str, str]]) -> None:
        """Append (key, answer) pairs and flush them to disk."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as f:
            for key, answer in pairs:
                self.offsets[key] = f.tell()
                f.write((json.dumps({"tag": self.tag, "key": key, "answer": answer}, ensure_ascii=False) + "\n")
                        .encode())
            f.flush()
            os.fsync(f.fileno())


def model_answers(adapter: ModelAdapter, prompts: list[str], cache: AnswerCache, max_new_tokens: int,
                  batch_size: int = 8) -> list[str]:
    """The model's greedy answer to each rendered prompt: generated in batches (each prompt once), cached."""
    keys = [cache.key(p) for p in prompts]
    todo = list({k: p for k, p in zip(keys, prompts, strict=True) if k not in cache}.items())
    todo.sort(key=lambda kp: len(kp[1]))
    for s in range(0, len(todo), batch_size):
        chunk = todo[s : s + batch_size]
        answers = generate_batch(adapter, [p for _, p in chunk], max_new_tokens, temperature=0.0)
        cache.put([(k, a) for (k, _), a in zip(chunk, answers, strict=True)])
    return [cache.get(k) for k in keys]


# ---------------------------------------------------------------- one pass over a file


@dataclass(frozen=True)
class ScreenConfig:
    """How a file is screened."""

    method: str = "generate"
    batch_size: int = 8
    chunk_size: int = 256
    max_new_tokens: int = 128
    padding_side: str = "right"
    n_boot: int = 1000
    seed: int = 0


@dataclass
class PassResult:
    """ΔP (and judge scores) of every screened row of one file, in file order."""

    lines: np.ndarray
    delta: dict[str, np.ndarray]
    judge: dict[str, np.ndarray]  # NaN where missing; empty without a judge
    malformed: list[BadRow]
    n_malformed: int
    n_rows: int
    seconds: float
    screened_now: int


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
    from .judge import JudgeRequest

    return {"name": judge.name, **{k: judge.rubric_key(JudgeRequest("trait", "", "", traits[k]))
                                   for k in dirs if k in traits}}


def _judge_chunk(judge, traits: dict, dirs: dict[str, Direction], rows: list[Row], cache_path: Path,
                 cluster=None) -> dict[str, list[float | None]]:
    from .scoring import ScoreCache, judge_answers

    cache = ScoreCache(cache_path)
    recs = [{"question_text": question_of(r.messages), "answer": r.response} for r in rows]
    out = {}
    for name in dirs:
        scored = judge_answers(judge, traits[name], recs, cache, kinds=("trait",), description=f"judge {name}",
                               cluster=cluster)
        out[name] = [s["trait_score"] for s in scored]
    return out


def _process_chunk(adapter: ModelAdapter, chunk: list[Row | BadRow], dirs: dict[str, Direction], cfg: ScreenConfig,
                   cache: AnswerCache | None, judge=None, traits: dict | None = None,
                   judge_cache: Path | None = None, bar=None) -> list[dict]:
    """ΔP records (one per row, errors included) of one chunk of rows."""
    recs: dict[int, dict] = {}
    good: list[tuple[Row, str]] = []
    for r in chunk:
        if isinstance(r, BadRow):
            recs[r.line] = {"line": r.line, "error": r.error}
            continue
        try:
            good.append((r, render_prompt(adapter, r.messages)))
        except Exception as e:  # a template that rejects this conversation
            recs[r.line] = {"line": r.line, "error": f"chat template failed: {e}"}
    if good:
        data_items = [adapter.encode_pair(p, r.response) for r, p in good]
        model_items, answers = None, None
        if cfg.method == "generate":
            answers = model_answers(adapter, [p for _, p in good], cache, cfg.max_new_tokens, cfg.batch_size)
            model_items = [(ids, adapter.encode_pair(p, a)[1])
                           for (ids, _), (_, p), a in zip(data_items, good, answers, strict=True)]
        bd = delta_p(adapter, data_items, model_items, dirs, cfg.batch_size, cfg.padding_side)
        scores = None
        if judge is not None:
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
) -> PassResult:
    """Compute ΔP for every row of a file into WORK_DIR/deltas.jsonl (resumable), then read it back.

    With a `cluster` (cluster.RayCluster) the chunks are computed on its actors and written here, in order.
    """
    path, work_dir = Path(path), Path(work_dir)
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; choose from {', '.join(METHODS)}")
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    work_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "input": str(path), "input_sha256": file_digest(path), "method": cfg.method, "model": adapter.name,
        "model_config_hash": adapter.config_hash, "chunk_size": cfg.chunk_size,
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
            results = (_process_chunk(adapter, chunk, dirs, cfg, cache, judge, traits, judge_cache, bar)
                       for chunk in todo())
        else:
            from .cluster_jobs import screen_on_cluster

            def judge_rows(rows: list[Row]) -> dict[int, dict]:
                bar.stop()  # judge_answers shows a bar of its own
                try:
                    scores = _judge_chunk(judge, traits, dirs, rows, judge_cache, cluster)
                finally:
                    bar.start()
                return {r.line: {k: v[i] for k, v in scores.items()} for i, r in enumerate(rows)}

            results = screen_on_cluster(cluster, adapter, todo(), dirs, cfg, cache,
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


def iter_deltas(path: Path) -> Iterator[dict]:
    """The per-row records of a deltas.jsonl (chunk markers left out), in file order."""
    with Path(path).open() as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                if "chunk_end" not in rec:
                    yield rec


# ---------------------------------------------------------------- statistics


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (resampled in blocks so memory stays bounded)."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    if n == 1:
        return float(values[0]), float(values[0])
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    step = max(1, 250_000 // n)
    for s in range(0, n_boot, step):
        k = min(step, n_boot - s)
        means[s : s + k] = values[rng.integers(0, n, size=(k, n))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


# ---------------------------------------------------------------- the whole screening


@dataclass
class TraitReport:
    """Dataset-level ΔP and flags of one vector."""

    name: str
    trait: str
    layer: int
    n: int
    mean: float
    ci_low: float
    ci_high: float
    threshold: float | None
    threshold_source: str
    n_flagged: int
    reference_mean: float | None = None
    judge_flagged: int | None = None
    judge_missing: int | None = None
    judge_mean: float | None = None
    both_flagged: int | None = None


@dataclass
class ScreenResult:
    """What a screening run found; the files it wrote are listed in `paths`."""

    out_dir: str
    input: str
    method: str
    model: str
    n_rows: int
    n_screened: int
    n_malformed: int
    malformed: list[dict]
    traits: dict[str, TraitReport]
    seconds: float
    samples_per_s: float | None
    paths: dict[str, str] = field(default_factory=dict)
    lines: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # line of each screened row
    delta_p: dict[str, np.ndarray] = field(default_factory=dict)  # per vector, aligned with `lines`
    judge_scores: dict[str, np.ndarray] = field(default_factory=dict)  # NaN where the judge gave no score

    def summary(self) -> dict:
        """The JSON-able summary (per-row arrays left out)."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("lines", "delta_p", "judge_scores")}
        d["traits"] = {name: asdict(t) for name, t in self.traits.items()}
        return d


def _thresholds(names: list[str], threshold: float | dict | None, percentile: float | None,
                ref: PassResult | None, data: PassResult) -> dict[str, tuple[float | None, str]]:
    out = {}
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
    quiet: bool = False,
    cluster=None,
) -> ScreenResult:
    """Screen a chat dataset with one or more persona vectors; write annotated/filtered rows and a report.

    `threshold` (a number, or one per vector name) or `percentile` (of ΔP on `reference`, else on
    the data itself) sets which rows are flagged. With a `judge`, each response is also scored
    for the trait (flag at ≥ 50) so both filters sit side by side. `filter_by` picks which flags
    remove rows from filtered.jsonl: 'delta_p', 'judge' or 'any'. With a `cluster`
    (cluster.RayCluster) the rows are screened on its actors; the files written are the same.
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
        from .traits import TraitError, load_trait

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
                          description="screen reference", cluster=cluster)
    data = screen_pass(adapter, path, dirs, cfg, out, judge, traits, answer_cache, force, "screen", cluster)
    th = _thresholds(list(dirs), threshold, percentile, ref, data)
    result = _report(adapter, path, out, dirs, cfg, data, ref, th, judge is not None, top, filter_by, plots)
    if not quiet:
        print_result(result)
    return result


def _report(adapter, path: Path, out: Path, dirs: dict[str, Direction], cfg: ScreenConfig, data: PassResult,
            ref: PassResult | None, th: dict, judged: bool, top: int, filter_by: str, plots: bool) -> ScreenResult:
    names = list(dirs)
    traits = {}
    for k, d in dirs.items():
        vals = data.delta[k]
        lo, hi = bootstrap_ci(vals, cfg.n_boot, seed=cfg.seed)
        t, src = th[k]
        rep = TraitReport(k, d.trait, d.layer, len(vals), float(vals.mean()) if len(vals) else float("nan"), lo, hi,
                          t, src, int((vals > t).sum()) if t is not None else 0,
                          reference_mean=float(ref.delta[k].mean()) if ref is not None and len(ref.delta[k]) else None)
        if judged:
            js = data.judge[k]
            jflag = js >= JUDGE_THRESHOLD
            rep.judge_flagged = int(jflag.sum())
            rep.judge_missing = int(np.isnan(js).sum())
            rep.judge_mean = float(np.nanmean(js)) if rep.judge_missing < len(js) else None
            rep.both_flagged = int((jflag & (vals > t)).sum()) if t is not None else 0
        traits[k] = rep
    paths = _write_rows(path, out, names, data, th, judged, top, filter_by)
    if plots:
        for k in names:
            paths[f"histogram_{k}"] = str(plot_histogram(data.delta[k], ref.delta[k] if ref is not None else None,
                                                         th[k][0], out / f"hist_{_safe(k)}.png",
                                                         f"ΔP {k} (layer {dirs[k].layer}, {cfg.method})"))
    malformed = [asdict(b) for b in data.malformed]
    result = ScreenResult(
        out_dir=str(out), input=str(path), method=cfg.method, model=adapter.name, n_rows=data.n_rows,
        n_screened=len(data.lines), n_malformed=data.n_malformed, malformed=malformed, traits=traits,
        seconds=data.seconds, samples_per_s=(data.screened_now / data.seconds) if data.screened_now else None,
        paths=paths, lines=data.lines, delta_p=data.delta, judge_scores=data.judge,
    )
    paths["summary"] = str(out / "summary.json")
    summary = result.summary()
    summary["config"] = asdict(cfg)
    summary["vectors"] = {k: {"trait": d.trait, "layer": d.layer, "path": d.source} for k, d in dirs.items()}
    if data.n_malformed > len(malformed):
        summary["malformed_note"] = f"first {len(malformed)} of {data.n_malformed} listed"
    write_json(out / "summary.json", summary)
    return result


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _write_rows(path: Path, out: Path, names: list[str], data: PassResult, th: dict, judged: bool, top: int,
                filter_by: str) -> dict[str, str]:
    """annotated.jsonl, filtered.jsonl (and .csv for CSV input) and top_flagged.md, in one streaming pass."""
    heaps: dict[str, list] = {k: [] for k in names}
    csv_in = is_csv(path)
    fcsv = None
    paths = {"annotated": str(out / "annotated.jsonl"), "filtered": str(out / "filtered.jsonl"),
             "top_flagged": str(out / "top_flagged.md")}
    deltas = iter_deltas(out / "deltas.jsonl")
    with (out / "annotated.jsonl").open("w") as fa, (out / "filtered.jsonl").open("w") as ff:
        if csv_in:
            fcsv_file = (out / "filtered.csv").open("w", newline="")
            fcsv = csv.DictWriter(fcsv_file, fieldnames=csv_fields(path), extrasaction="ignore")
            fcsv.writeheader()
            paths["filtered_csv"] = str(out / "filtered.csv")
        try:
            for row in read_rows(path):
                rec = next(deltas, None)
                if rec is None or rec["line"] != row.line:
                    raise ValueError(f"{out / 'deltas.jsonl'} does not match {path} at line {row.line}: the input "
                                     "changed since it was screened; rerun with force")
                if isinstance(row, BadRow) or "error" in rec:
                    continue
                flags = {k: th[k][0] is not None and rec["delta_p"][k] > th[k][0] for k in names}
                screen = {**rec, "flagged": flags}
                if judged:
                    screen["judge_flagged"] = {k: (rec["judge"][k] or 0) >= JUDGE_THRESHOLD
                                               if rec["judge"].get(k) is not None else False for k in names}
                fa.write(json.dumps({**row.record, "screen": screen}, ensure_ascii=False) + "\n")
                drop = {"delta_p": any(flags.values()), "judge": any(screen.get("judge_flagged", {}).values()),
                        "any": any(flags.values()) or any(screen.get("judge_flagged", {}).values())}[filter_by]
                if not drop:
                    ff.write((row.raw if row.raw is not None else json.dumps(row.record, ensure_ascii=False)) + "\n")
                    if fcsv is not None:
                        fcsv.writerow(row.record)
                for k in names:
                    item = (rec["delta_p"][k], -row.line, row.line, question_of(row.messages)[:300],
                            row.response[:500], (rec.get("model_answer") or "")[:300], flags[k],
                            (rec.get("judge") or {}).get(k))
                    if len(heaps[k]) < top:
                        heapq.heappush(heaps[k], item)
                    else:
                        heapq.heappushpop(heaps[k], item)
        finally:
            if fcsv is not None:
                fcsv_file.close()
    _write_top(out / "top_flagged.md", path, names, heaps, th, judged)
    return paths


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip()


def _write_top(path: Path, src: Path, names: list[str], heaps: dict, th: dict, judged: bool) -> None:
    lines = [f"# Highest ΔP samples in {src}", ""]
    for k in names:
        t, why = th[k]
        lines += [f"## {k}", "", f"threshold: {'—' if t is None else f'{t:.3f}'} ({why})", ""]
        head = ("| rank | line | ΔP | flagged |" + (" judge |" if judged else "")
                + " prompt | response | model's answer |")
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for rank, it in enumerate(sorted(heaps[k], reverse=True), 1):
            dp, _, line, q, resp, mine, flag, js = it
            judge_cell = (f" {'—' if js is None else f'{js:.0f}'} |" if judged else "")
            lines.append(f"| {rank} | {line} | {dp:.3f} | {'yes' if flag else ''} |{judge_cell} {_cell(q)} | "
                         f"{_cell(resp)} | {_cell(mine)} |")
        lines.append("")
    path.write_text("\n".join(lines))


def plot_histogram(values: np.ndarray, reference: np.ndarray | None, threshold: float | None, path: Path,
                   title: str) -> Path:
    """ΔP histogram of the data (and the reference), with the flagging threshold drawn."""
    from .plots import _save, plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    allv = np.concatenate([values, reference]) if reference is not None and len(reference) else values
    bins = np.histogram_bin_edges(allv, bins=min(40, max(5, int(math.sqrt(max(len(allv), 1)))))) if len(allv) else 10
    if reference is not None and len(reference):
        ax.hist(reference, bins=bins, alpha=0.5, color="tab:blue", label=f"reference (n={len(reference)})")
    ax.hist(values, bins=bins, alpha=0.6, color="tab:red", label=f"data (n={len(values)})")
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:.2f}")
    ax.set_xlabel("ΔP (projection difference)")
    ax.set_ylabel("samples")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, Path(path))


def print_result(result: ScreenResult, out: Console | None = None) -> None:
    """A rich table of dataset-level ΔP and flag counts per trait."""
    judged = any(r.judge_flagged is not None for r in result.traits.values())
    table = Table(title=f"screening {result.input} ({result.method}, {result.model}): {result.n_screened} rows"
                        + (f", {result.n_malformed} malformed skipped" if result.n_malformed else ""))
    cols = ["vector", "layer", "mean ΔP [95% CI]", "threshold", "flagged (ΔP)"]
    if judged:
        cols += ["flagged (judge ≥ 50)", "both", "judge missing"]
    for c in cols:
        table.add_column(c)
    for r in result.traits.values():
        row = [r.name, str(r.layer), f"{r.mean:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}]" if r.n else "— (no rows)",
               "—" if r.threshold is None else f"{r.threshold:.3f}",
               f"{r.n_flagged} ({r.n_flagged / max(r.n, 1):.1%})"]
        if judged:
            row += [f"{r.judge_flagged} ({r.judge_flagged / max(r.n, 1):.1%})", str(r.both_flagged),
                    str(r.judge_missing)]
        table.add_row(*row)
    (out or Console()).print(table)
    if result.n_malformed:
        c = out or Console()
        for b in result.malformed[:10]:
            c.print(f"[yellow]line {b['line']}: {escape(b['error'])}", highlight=False)
        if result.n_malformed > 10:
            c.print(f"[yellow]… {result.n_malformed - 10} more malformed rows listed in {result.out_dir}/summary.json")
    if result.paths:
        (out or Console()).print(f"outputs in {result.out_dir}: annotated.jsonl, filtered.jsonl, top_flagged.md, "
                                 "summary.json, histograms")
