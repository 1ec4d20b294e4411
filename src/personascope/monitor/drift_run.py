"""The offline drift run: stream a JSONL file of conversations, keep every trajectory on disk, flag, report."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from personascope.model import MAX_ROW_BYTES, ChatError, ModelAdapter, check_messages
from personascope.util import JsonlStore, bind_run, write_json

from .drift import DriftVector, Trajectory, layout, trajectories
from .drift_report import write_report
from .drift_rule import DriftRule

log = logging.getLogger(__name__)
FILES = ("trajectories.jsonl", "turns.jsonl", "errors.jsonl", "summary.json", "report.html")


@dataclass
class Conversation:
    """One line of the input: its number, id and validated messages."""

    line: int
    id: str
    messages: list[dict]


@dataclass
class BadLine:
    """A line that could not be used, and why."""

    line: int
    error: str


@dataclass
class DriftResult:
    """What a drift run found and where it wrote it."""

    conversations: int
    turns: int
    flagged: dict[str, list[str]]  # vector -> ids of flagged conversations
    errors: list[dict]
    out_dir: Path
    seconds: float
    files: dict[str, str] = field(default_factory=dict)


def read_conversations(path: Path) -> Iterator[Conversation | BadLine]:
    """Each non-empty line as a Conversation, or a BadLine naming what is wrong with it (never raises on content)."""
    with Path(path).open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            if len(raw) > MAX_ROW_BYTES:
                yield BadLine(lineno, f"the line is {len(raw)} bytes; the limit is {MAX_ROW_BYTES}")
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
                if not isinstance(row, dict) or "messages" not in row:
                    raise ChatError('expected a JSON object with a "messages" list')
                msgs = check_messages(row["messages"], answer=False)
                cid = row.get("id", f"line-{lineno}")
                if not isinstance(cid, str | int):
                    raise ChatError("'id' must be a string or a number")
            except (UnicodeDecodeError, json.JSONDecodeError, ChatError) as e:
                yield BadLine(lineno, str(e))
                continue
            yield Conversation(lineno, str(cid), msgs)


def _row(conv: Conversation, traj: Trajectory, rule: DriftRule) -> dict:
    alerts = {}
    for name in traj.layers:
        alert = rule.first_alert(name, traj.series(name, rule.span, z=True))
        if alert is not None:
            alerts[name] = alert.to_dict()
    return {"line": conv.line, "id": conv.id, "layers": traj.layers, "turns": [vars(t) for t in traj.turns],
            "alerts": alerts, "texts": [m["content"] for m in conv.messages],
            "roles": [m["role"] for m in conv.messages]}


def _batches(items: Iterator[Conversation | BadLine], n: int) -> Iterator[list[Conversation | BadLine]]:
    buf: list[Conversation | BadLine] = []
    for it in items:
        buf.append(it)
        if len([x for x in buf if isinstance(x, Conversation)]) >= n:
            yield buf
            buf = []
    if buf:
        yield buf


def run_drift(adapter: ModelAdapter, data: Path, vectors: list[DriftVector], rule: DriftRule, out_dir: Path,
              batch_size: int = 4, force: bool = False, max_plots: int = 50, settings: dict | None = None,
              ) -> DriftResult:
    """Trajectories of every conversation in `data`, resumable in `out_dir`; flags by `rule`; writes the report."""
    t0 = time.monotonic()
    out_dir = Path(out_dir)
    if not Path(data).exists():
        raise FileNotFoundError(f"{data} does not exist")
    bind_run(out_dir, {"data": str(Path(data).resolve()), "model": adapter.name,
                       "vectors": {dv.name: [str(dv.vector.path), dv.layer] for dv in vectors},
                       **(settings or {})}, "drift run", force, FILES)
    store = JsonlStore(out_dir / "trajectories.jsonl", ("line",))
    errors = JsonlStore(out_dir / "errors.jsonl", ("line",))
    if store or errors:
        log.info(f"{out_dir}: resuming after {len(store)} conversations")
    limit = adapter.context_length
    for batch in _batches(read_conversations(data), batch_size):
        todo: list[Conversation] = []
        bad: list[dict] = []
        for it in batch:
            if (it.line,) in store or (it.line,) in errors:
                continue
            if isinstance(it, BadLine):
                bad.append({"line": it.line, "error": it.error})
                continue
            try:
                n = len(layout(adapter, it.messages).ids)
            except ChatError as e:
                bad.append({"line": it.line, "error": str(e)})
                continue
            if n > limit:
                bad.append({"line": it.line, "error": f"{n} tokens; {adapter.name} takes at most {limit}"})
                continue
            todo.append(it)
        for b in bad:
            log.warning(f"{data}:{b['line']}: skipped ({b['error']})")
        errors.append(bad)
        if todo:
            trajs = trajectories(adapter, [c.messages for c in todo], vectors, [c.id for c in todo], batch_size)
            store.append(_row(c, t, rule) for c, t in zip(todo, trajs, strict=True))
    rows = sorted(store.records.values(), key=lambda r: r["line"])
    with (out_dir / "turns.jsonl").open("w") as f:
        for r in rows:
            for t in r["turns"]:
                f.write(json.dumps({"line": r["line"], "id": r["id"], **t}) + "\n")
    flagged = {dv.name: [r["id"] for r in rows if dv.name in r["alerts"]] for dv in vectors}
    err_rows = sorted(errors.records.values(), key=lambda r: r["line"])
    n_turns = sum(len(r["turns"]) for r in rows)
    summary = {"data": str(data), "model": adapter.name, "rule": rule.describe(), "conversations": len(rows),
               "turns": n_turns, "skipped_lines": err_rows,
               "flagged": {k: {"n": len(v), "ids": v} for k, v in flagged.items()},
               "layers": {dv.name: dv.layer for dv in vectors},
               "calibrated": {dv.name: dv.normal is not None for dv in vectors}}
    write_json(out_dir / "summary.json", summary)
    report = write_report(rows, summary, rule, out_dir / "report.html", max_plots)
    return DriftResult(len(rows), n_turns, flagged, err_rows, out_dir, time.monotonic() - t0,
                       {"summary": str(out_dir / "summary.json"), "turns": str(out_dir / "turns.jsonl"),
                        "report": str(report)})
