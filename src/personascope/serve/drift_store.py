"""Where the server keeps conversations' trajectories: SQLite (a file, WAL mode) or PostgreSQL (a URL, psycopg 3).

Four tables (docs/drift.md): `conversations` (one row each, with the turn of its first alert and the auto-guard
mode), `turns` (one row per recorded assistant turn), `projections` (one row per turn and vector: pre-turn and
response-average projections and their z-scores) and `alerts` (the first alert per conversation and vector).
A turn, its projections, the rule's verdict and any alert are written in one transaction.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from personascope.monitor import Alert, DriftRule

log = logging.getLogger(__name__)

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS conversations (
        id TEXT PRIMARY KEY, created DOUBLE PRECISION NOT NULL, updated DOUBLE PRECISION NOT NULL,
        model TEXT NOT NULL, turns INTEGER NOT NULL DEFAULT 0, alert_turn INTEGER, guard_mode TEXT,
        guard_vector TEXT)""",
    """CREATE TABLE IF NOT EXISTS turns (
        conversation_id TEXT NOT NULL, turn INTEGER NOT NULL, created DOUBLE PRECISION NOT NULL,
        request_id TEXT NOT NULL, user_text TEXT, assistant_text TEXT, n_tokens INTEGER NOT NULL,
        finish_reason TEXT, guard_mode TEXT, guarded_tokens INTEGER NOT NULL DEFAULT 0,
        latency_ms DOUBLE PRECISION, PRIMARY KEY (conversation_id, turn))""",
    """CREATE TABLE IF NOT EXISTS projections (
        conversation_id TEXT NOT NULL, turn INTEGER NOT NULL, vector TEXT NOT NULL, layer INTEGER NOT NULL,
        pre DOUBLE PRECISION, pre_z DOUBLE PRECISION, response DOUBLE PRECISION, response_z DOUBLE PRECISION,
        PRIMARY KEY (conversation_id, turn, vector))""",
    """CREATE TABLE IF NOT EXISTS alerts (
        conversation_id TEXT NOT NULL, vector TEXT NOT NULL, turn INTEGER NOT NULL, reason TEXT NOT NULL,
        value DOUBLE PRECISION NOT NULL, rule TEXT NOT NULL, guard_mode TEXT, created DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (conversation_id, vector))""",
    "CREATE INDEX IF NOT EXISTS conversations_updated ON conversations (updated)",
)


class StoreError(RuntimeError):
    """The drift database cannot be opened or written (the message names the file or URL)."""


@dataclass
class TurnRecord:
    """One assistant turn as the server saw it."""

    conversation_id: str
    turn: int
    request_id: str
    model: str
    n_tokens: int
    layers: dict[str, int]
    pre: dict[str, float | None]
    pre_z: dict[str, float | None]
    response: dict[str, float | None]
    response_z: dict[str, float | None]
    user_text: str | None = None
    assistant_text: str | None = None
    finish_reason: str | None = None
    guard_mode: str | None = None
    guarded_tokens: int = 0
    latency_ms: float | None = None
    created: float = field(default_factory=time.time)


def is_postgres(target: str) -> bool:
    return target.startswith(("postgresql://", "postgres://"))


def redact(target: str) -> str:
    """A database URL without its password (for messages)."""
    if not is_postgres(target) or "@" not in target:
        return target
    scheme, rest = target.split("://", 1)
    cred, host = rest.rsplit("@", 1)
    return f"{scheme}://{cred.split(':', 1)[0]}:***@{host}" if ":" in cred else target


class DriftStore:
    """A connection to the drift database, safe to share between threads (one writer at a time)."""

    def __init__(self, target: str | Path):
        self.target = str(target)
        self.postgres = is_postgres(self.target)
        self._lock = threading.Lock()
        self._conn: Any = None
        self.where = redact(self.target)
        self._connect()

    # -- connection
    def _connect(self) -> None:
        where = redact(self.target)
        try:
            if self.postgres:
                import psycopg

                self._conn = psycopg.connect(self.target, connect_timeout=5, autocommit=False)
            else:
                path = Path(self.target)
                path.parent.mkdir(parents=True, exist_ok=True)
                self._conn = sqlite3.connect(str(path), timeout=30, check_same_thread=False, isolation_level=None)
                mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise StoreError(f"{where}: the database would not switch to WAL mode (got {mode})")
                self._conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: commits survive a killed process
            with self._tx() as cur:
                for stmt in SCHEMA:
                    cur.execute(stmt)
        except ImportError:
            raise StoreError(f"{where}: PostgreSQL needs the psycopg driver (pip install 'personascope[postgres]')"
                             ) from None
        except StoreError:
            raise
        except Exception as e:
            raise StoreError(f"cannot open the drift database {where}: {str(e).strip().splitlines()[0]}") from None

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.postgres else sql

    class _Tx:
        def __init__(self, store: DriftStore):
            self.store = store

        def __enter__(self):
            s = self.store
            self.cur = s._conn.cursor()
            if not s.postgres:
                self.cur.execute("BEGIN IMMEDIATE")
            return self

        def execute(self, sql: str, params: Sequence = ()) -> Any:
            self.cur.execute(self.store._sql(sql), tuple(params))
            return self.cur

        def __exit__(self, exc_type, exc, tb) -> None:
            conn = self.store._conn
            if exc_type is None:
                conn.execute("COMMIT") if not self.store.postgres else conn.commit()
            else:
                with contextlib.suppress(Exception):
                    conn.execute("ROLLBACK") if not self.store.postgres else conn.rollback()
            self.cur.close()

    def _tx(self) -> DriftStore._Tx:
        return DriftStore._Tx(self)

    def _run(self, fn, *args):
        """Run fn(tx, *args) in one transaction (reconnecting once to a PostgreSQL server that dropped us)."""
        with self._lock:
            if self._conn is None:
                raise StoreError(f"the drift database {redact(self.target)} is closed")
            try:
                with self._tx() as tx:
                    return fn(tx, *args)
            except Exception as e:
                if not self.postgres or not getattr(self._conn, "closed", False):
                    raise
                log.warning(f"{redact(self.target)}: reconnecting after {type(e).__name__}")
                self._connect()
                with self._tx() as tx:
                    return fn(tx, *args)

    # -- writes
    def record(self, rec: TurnRecord, rule: DriftRule, auto_guard: str | None = None) -> list[Alert]:
        """Write one turn (replacing a retried one), evaluate the rule on each vector's series; new alerts."""
        return self._run(self._record, rec, rule, auto_guard)

    @staticmethod
    def _record(tx: DriftStore._Tx, rec: TurnRecord, rule: DriftRule, auto_guard: str | None) -> list[Alert]:
        now = rec.created
        tx.execute("INSERT INTO conversations (id, created, updated, model, turns) VALUES (?, ?, ?, ?, ?) "
                   "ON CONFLICT (id) DO UPDATE SET updated = excluded.updated, "
                   "turns = CASE WHEN conversations.turns > excluded.turns THEN conversations.turns "
                   "ELSE excluded.turns END", (rec.conversation_id, now, now, rec.model, rec.turn + 1))
        tx.execute("INSERT INTO turns (conversation_id, turn, created, request_id, user_text, assistant_text, "
                   "n_tokens, finish_reason, guard_mode, guarded_tokens, latency_ms) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (conversation_id, turn) DO UPDATE SET "
                   "created = excluded.created, request_id = excluded.request_id, user_text = excluded.user_text, "
                   "assistant_text = excluded.assistant_text, n_tokens = excluded.n_tokens, "
                   "finish_reason = excluded.finish_reason, guard_mode = excluded.guard_mode, "
                   "guarded_tokens = excluded.guarded_tokens, latency_ms = excluded.latency_ms",
                   (rec.conversation_id, rec.turn, now, rec.request_id, rec.user_text, rec.assistant_text,
                    rec.n_tokens, rec.finish_reason, rec.guard_mode, rec.guarded_tokens, rec.latency_ms))
        for name, layer in rec.layers.items():
            tx.execute("INSERT INTO projections (conversation_id, turn, vector, layer, pre, pre_z, response, "
                       "response_z) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (conversation_id, turn, vector) "
                       "DO UPDATE SET layer = excluded.layer, pre = excluded.pre, pre_z = excluded.pre_z, "
                       "response = excluded.response, response_z = excluded.response_z",
                       (rec.conversation_id, rec.turn, name, layer, rec.pre.get(name), rec.pre_z.get(name),
                        rec.response.get(name), rec.response_z.get(name)))
        column = "pre_z" if rule.span == "pre" else "response_z"
        fresh: list[Alert] = []
        for name in rec.layers:
            if tx.execute("SELECT 1 FROM alerts WHERE conversation_id = ? AND vector = ?",
                          (rec.conversation_id, name)).fetchone():
                continue
            series = [r[0] for r in tx.execute(
                f"SELECT {column} FROM projections WHERE conversation_id = ? AND vector = ? ORDER BY turn",
                (rec.conversation_id, name)).fetchall()]
            alert = rule.first_alert(name, series)
            if alert is None:
                continue
            tx.execute("INSERT INTO alerts (conversation_id, vector, turn, reason, value, rule, guard_mode, created) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (conversation_id, vector) DO NOTHING",
                       (rec.conversation_id, name, rec.turn, alert.reason, alert.value, rule.describe(), auto_guard,
                        now))
            tx.execute("UPDATE conversations SET alert_turn = COALESCE(alert_turn, ?), "
                       "guard_mode = COALESCE(guard_mode, ?), guard_vector = COALESCE(guard_vector, ?) WHERE id = ?",
                       (rec.turn, auto_guard, name if auto_guard else None, rec.conversation_id))
            fresh.append(Alert(name, rec.turn, alert.reason, alert.value))
        return fresh

    # -- reads
    def guard_of(self, conversation_id: str) -> tuple[str, str, int] | None:
        """(mode, vector, alert turn) of a conversation whose auto-guard is engaged, else None."""
        def read(tx):
            return tx.execute("SELECT guard_mode, guard_vector, alert_turn FROM conversations WHERE id = ?",
                              (conversation_id,)).fetchone()

        row = self._run(read)
        return (row[0], row[1], int(row[2])) if row and row[0] and row[1] is not None else None

    def conversation(self, conversation_id: str) -> dict | None:
        """A conversation with its turns (and their projections) and alerts; None if unknown."""
        return self._run(self._conversation, conversation_id)

    @staticmethod
    def _conversation(tx, cid: str) -> dict | None:
        row = tx.execute("SELECT id, created, updated, model, turns, alert_turn, guard_mode, guard_vector "
                         "FROM conversations WHERE id = ?", (cid,)).fetchone()
        if row is None:
            return None
        keys = ("id", "created", "updated", "model", "turns", "alert_turn", "guard_mode", "guard_vector")
        out: dict = dict(zip(keys, row, strict=True))
        turn_keys = ("turn", "created", "request_id", "user_text", "assistant_text", "n_tokens", "finish_reason",
                     "guard_mode", "guarded_tokens", "latency_ms")
        turns = {r[0]: {**dict(zip(turn_keys, r, strict=True)), "projections": {}} for r in tx.execute(
            f"SELECT {', '.join(turn_keys)} FROM turns WHERE conversation_id = ? ORDER BY turn", (cid,)).fetchall()}
        for r in tx.execute("SELECT turn, vector, layer, pre, pre_z, response, response_z FROM projections "
                            "WHERE conversation_id = ? ORDER BY turn", (cid,)).fetchall():
            if r[0] in turns:
                turns[r[0]]["projections"][r[1]] = dict(zip(("layer", "pre", "pre_z", "response", "response_z"),
                                                            r[2:], strict=True))
        out["turn_records"] = list(turns.values())
        out["alerts"] = [dict(zip(("vector", "turn", "reason", "value", "rule", "guard_mode", "created"), r,
                                  strict=True)) for r in tx.execute(
            "SELECT vector, turn, reason, value, rule, guard_mode, created FROM alerts WHERE conversation_id = ? "
            "ORDER BY turn", (cid,)).fetchall()]
        return out

    def recent(self, limit: int = 50) -> list[dict]:
        """The most recently updated conversations with each vector's pre-turn z series (raw where uncalibrated)."""
        return self._run(self._recent, limit)

    @staticmethod
    def _recent(tx, limit: int) -> list[dict]:
        rows = tx.execute("SELECT id, updated, turns, alert_turn, guard_mode FROM conversations "
                          "ORDER BY updated DESC LIMIT ?", (limit,)).fetchall()
        out = []
        for cid, updated, turns, alert_turn, guard_mode in rows:
            series: dict[str, list] = {}
            for vec, turn, pre, pre_z in tx.execute("SELECT vector, turn, pre, pre_z FROM projections WHERE "
                                                    "conversation_id = ? ORDER BY turn", (cid,)).fetchall():
                series.setdefault(vec, []).append([turn, pre_z if pre_z is not None else pre])
            alerts = [r[0] for r in tx.execute("SELECT vector FROM alerts WHERE conversation_id = ?",
                                               (cid,)).fetchall()]
            out.append({"id": cid, "updated": updated, "turns": turns, "alert_turn": alert_turn,
                        "guard_mode": guard_mode, "alerts": alerts, "series": series})
        return out

    def count(self, table: str = "turns") -> int:
        if table not in ("turns", "conversations", "projections", "alerts"):
            raise ValueError(f"unknown table {table!r}")
        return int(self._run(lambda tx: tx.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]))
