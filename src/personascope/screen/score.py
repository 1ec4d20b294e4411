"""Data screening with persona vectors: the projection difference ΔP per sample.

For a chat sample (prompt x, dataset response y) and a trait vector v̂ at layer l:

- `generate` (the paper's method): ΔP = ā(x, y)·v̂ − ā(x, y')·v̂, where ā is the mean residual
  stream over the response tokens and y' is the model's own greedy answer to x. A positive ΔP
  means the dataset answers with more of the trait than the model would on its own.
- `last-token` (the cheap variant, no generation): the model's own answer is not generated; its
  projection is replaced by the projection of the last prompt token a_last(x)·v̂ (the position
  that predicts how strongly the answer will show the trait), so
  ΔP = ā(x, y)·v̂ − a_last(x)·v̂, one forward per sample. The two terms are on different scales,
  so only ranks and thresholds measured with the same method compare; `proj_baseline` in the
  annotated rows holds the last-prompt-token projection on its own.

Several vectors are screened in one pass: the needed layers are collected once per forward and
projected on every vector. The input is streamed in chunks; per-row results are appended to
`deltas.jsonl` (a chunk at a time, each closed by a marker line), the model's answers to
`model_answers.jsonl`, so an interrupted run resumes at the last finished chunk. Only one float per
row and trait (plus line numbers) is kept in memory, for the dataset mean, its bootstrap
interval, the percentile threshold and the histograms.

This module holds the primitives (reading rows, ΔP of a batch, the model's answers); `screen_run`
runs a screening over a file and `screen_report` writes and prints its report.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from personascope.model import (
    MAX_ROW_BYTES,
    ChatError,
    ModelAdapter,
    check_messages,
    generate_batch,
    iter_span_batches,
    split_answer,
)
from personascope.util import iter_json_lines
from personascope.vectors import PersonaVector

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
        try:
            prompt_turns, answer = split_answer(check_messages(rec["messages"]))
        except ChatError as e:
            return BadRow(line, str(e))
        return Row(line, rec, prompt_turns, answer, raw)
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
    try:  # the one chat check (a lone surrogate is not text)
        prompt_turns, answer = split_answer(check_messages([*msgs, {"role": "user", "content": prompt},
                                                            {"role": "assistant", "content": response}]))
    except ChatError as e:
        return BadRow(line, str(e))
    return Row(line, rec, prompt_turns, answer, raw)


def is_csv(path: Path) -> bool:
    return Path(path).suffix.lower() in (".csv", ".tsv")


def csv_fields(path: Path) -> list[str]:
    """The header of a CSV file; raises ValueError when it lacks the prompt/response columns."""
    with Path(path).open(newline="", encoding="utf-8-sig", errors="replace") as f:
        header = next(csv.reader(f, delimiter="\t" if Path(path).suffix.lower() == ".tsv" else ","), [])
    if not any(k in header for k in PROMPT_KEYS) or not any(k in header for k in RESPONSE_KEYS):
        raise ValueError(f"{path}: a CSV needs a prompt column ({'/'.join(PROMPT_KEYS)}) and a response column "
                         f"({'/'.join(RESPONSE_KEYS)}); its header is {header}")
    return header


def read_rows(path: str | Path) -> Iterator[Row | BadRow]:
    """Stream the rows of a chat JSONL or a prompt/response CSV; malformed rows come out as BadRow.

    Rows over MAX_ROW_BYTES are BadRows too (screening also skips rows longer than the model's context).

    Line numbers are 1-based physical lines (for CSV, the line a record starts on; the header is
    line 1). Blank JSONL lines are not rows.
    """
    path = Path(path)
    if is_csv(path):
        csv_fields(path)
        with path.open(newline="", encoding="utf-8-sig", errors="replace") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            start = 2
            for rec in reader:
                size = sum(len(v) for v in rec.values() if isinstance(v, str))
                if size > MAX_ROW_BYTES:
                    yield BadRow(start, f"the row has {size} characters; the limit is {MAX_ROW_BYTES}")
                elif None in rec:
                    yield BadRow(start, f"{len(rec[None])} more fields than the header")
                else:
                    yield parse_record({k: v for k, v in rec.items() if v is not None}, start)
                start = reader.line_num + 1
        return
    for line in iter_json_lines(path, MAX_ROW_BYTES):  # the reader finetune uses too (BOM, U+2028, U+0085)
        yield BadRow(line.line, line.error) if line.error is not None else parse_record(line.value, line.line,
                                                                                         line.text)


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


class AnswerLookup(Protocol):
    """What `model_answers` needs of an answer cache: `AnswerCache` on disk, or an in-memory one on a Ray actor."""

    def key(self, prompt_text: str) -> str: ...

    def __contains__(self, key: str) -> bool: ...

    def get(self, key: str) -> str: ...

    def put(self, pairs: list[tuple[str, str]]) -> None: ...


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


def model_answers(adapter: ModelAdapter, prompts: list[str], cache: AnswerLookup, max_new_tokens: int,
                  batch_size: int = 8, engine=None) -> list[str]:
    """The model's greedy answer to each rendered prompt: generated in batches (each prompt once), cached.
    With an `engine` (personascope.engines) they are generated there, all missing ones in one call."""
    keys = [cache.key(p) for p in prompts]
    todo = list({k: p for k, p in zip(keys, prompts, strict=True) if k not in cache}.items())
    todo.sort(key=lambda kp: len(kp[1]))
    if engine is not None and todo:
        from personascope.model import SamplingConfig

        outs = engine.generate([p for _, p in todo], SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens))
        cache.put([(k, a) for (k, _), a in zip(todo, outs, strict=True)])
        todo = []
    for s in range(0, len(todo), batch_size):
        chunk = todo[s : s + batch_size]
        answers = generate_batch(adapter, [p for _, p in chunk], max_new_tokens, temperature=0.0)
        cache.put([(k, a) for (k, _), a in zip(chunk, answers, strict=True)])
    return [cache.get(k) for k in keys]



def iter_deltas(path: Path) -> Iterator[dict]:
    """The per-row records of a deltas.jsonl (chunk markers left out), in file order."""
    with Path(path).open() as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                if "chunk_end" not in rec:
                    yield rec


