"""The drift store on a real PostgreSQL server (PERSONASCOPE_TEST_POSTGRES=postgresql://…; skipped without one)."""

from __future__ import annotations

import asyncio
import os
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from servers import MODEL, ThreadServer, tiny_vectors

from personascope.monitor import DriftRule, DriftVector
from personascope.serve import DriftService, DriftStore, Engine, ServeConfig, TurnRecord, create_app, load_serving_model
from personascope.vectors.file import load_vector

URL = os.environ.get("PERSONASCOPE_TEST_POSTGRES")


@pytest.fixture
def pg_url():
    """A fresh database on the test server, dropped afterwards."""
    if not URL:
        pytest.skip("PERSONASCOPE_TEST_POSTGRES is not set (no PostgreSQL server for the tests)")
    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as e:
        pytest.skip(f"PostgreSQL at PERSONASCOPE_TEST_POSTGRES is not reachable ({e})")
    name = f"drift_{uuid.uuid4().hex[:10]}"
    admin.execute(f"CREATE DATABASE {name}")
    base, _, _ = URL.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


def _rec(cid: str, turn: int, z: float) -> TurnRecord:
    return TurnRecord(cid, turn, f"r-{cid}-{turn}", MODEL, 3, {"opt": 2}, {"opt": z}, {"opt": z}, {"opt": 0.5},
                      {"opt": 0.1}, "hi", "hello")


def test_store_on_postgres_concurrent_writes_and_alerts(pg_url):
    store = DriftStore(pg_url)
    rule = DriftRule(z=2.0, turns=2)
    jobs = [(f"c{i}", t, 3.0 if i % 2 and t >= 1 else 0.0) for i in range(32) for t in range(3)]
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda j: store.record(_rec(*j), rule, "cap"), jobs))
    assert store.count("turns") == 96 and store.count("conversations") == 32
    assert store.count("alerts") == 16 and sum(len(r) for r in results) == 16
    conv = store.conversation("c1")
    assert conv["alert_turn"] == 2 and conv["guard_mode"] == "cap" and conv["turns"] == 3
    assert conv["turn_records"][1]["projections"]["opt"]["pre_z"] == 3.0
    assert store.guard_of("c1") == ("cap", "opt", 2) and store.guard_of("c0") is None
    assert len(store.recent(10)) == 10
    store.close()
    again = DriftStore(pg_url)  # the schema is created once; a second server reuses it
    assert again.count("turns") == 96
    again.close()


def test_server_records_to_postgres(pg_url, tmp_path):
    vecs = tiny_vectors(tmp_path)
    adapter = load_serving_model(MODEL)
    opt = load_vector(vecs["opt"])
    engine = Engine(adapter, {"opt": opt}, ServeConfig(batch_wait_ms=20), model_id=MODEL)
    drift = DriftService(engine, DriftStore(pg_url), [DriftVector("opt", opt, 2)], DriftRule())
    with ThreadServer(create_app(engine, drift)) as srv:
        async def main():
            async with httpx.AsyncClient(timeout=120) as client:
                rs = await asyncio.gather(*[client.post(srv.url + "/v1/chat/completions", json={
                    "model": MODEL, "conversation_id": f"p{i}", "max_tokens": 5, "temperature": 0,
                    "messages": [{"role": "user", "content": f"hi {i}"}]}) for i in range(16)])
                assert all(r.status_code == 200 for r in rs)

        asyncio.run(main())
        assert httpx.get(srv.url + "/v1/conversations/p3").json()["turn_records"][0]["n_tokens"] >= 1
        assert drift.store.count("turns") == 16
