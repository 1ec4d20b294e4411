"""Drift recording in the server, on loopback: concurrent clients, exact pre-turn values, alerts, auto-guard,
/metrics, SIGKILL mid-load, and one-line start-up errors."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from servers import CLI, MODEL, ThreadServer, free_port, tiny_vectors

from personascope.monitor import DriftRule, DriftVector, Normal, trajectory
from personascope.serve import DriftService, DriftStore, Engine, GuardItem, ServeConfig, load_serving_model
from personascope.steering.calibration import GuardCalibration
from personascope.vectors.file import load_vector


@pytest.fixture(scope="module")
def vectors(tmp_path_factory):
    return tiny_vectors(tmp_path_factory.mktemp("vectors"))


def _service(vectors, db, rule: DriftRule, auto_guard: str | None = None, max_batch: int = 8,
             names: tuple[str, ...] = ("opt", "hum")):
    adapter = load_serving_model(MODEL)
    loaded = {n: load_vector(p) for n, p in vectors.items()}
    engine = Engine(adapter, loaded, ServeConfig(max_batch=max_batch, batch_wait_ms=20, max_queue=512),
                    model_id=MODEL)
    cal = GuardCalibration.from_vector(loaded["opt"])
    assert cal is not None and cal.normal("prompt") is not None
    (pm, ps), (rm, rs) = cal.normal("prompt"), cal.normal("response")
    dvs = [DriftVector("opt", loaded["opt"], cal.layer, Normal(pm, ps, rm, rs)), DriftVector("hum", loaded["hum"], 3)]
    dvs = [dv for dv in dvs if dv.name in names]
    guards = {"opt": GuardItem("opt", cal.layer, auto_guard or "cap", None, cal.hi, None, "response")}
    return engine, DriftService(engine, DriftStore(db), dvs, rule, auto_guard, guards)


async def _conversation(client: httpx.AsyncClient, url: str, i: int, turns: int, acked: list) -> None:
    msgs = [{"role": "user", "content": f"hello number {i}"}]
    for t in range(turns):
        r = await client.post(url + "/v1/chat/completions", headers={"X-Conversation-Id": f"c{i}"},
                              json={"model": MODEL, "messages": msgs, "max_tokens": 6, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        acked.append((f"c{i}", t, body["id"], [dict(m) for m in msgs]))
        assert "monitor" not in body  # the drift monitor does not leak into the client's response
        msgs += [body["choices"][0]["message"], {"role": "user", "content": f"and then {t}?"}]


def test_concurrent_clients_every_turn_recorded_and_exact(vectors, tmp_path):
    engine, drift = _service(vectors, tmp_path / "d.sqlite3", DriftRule(z=1e9, turns=1))
    from personascope.serve import create_app

    acked: list = []
    with ThreadServer(create_app(engine, drift)) as srv:
        async def main():
            async with httpx.AsyncClient(timeout=120) as client:
                await asyncio.gather(*[_conversation(client, srv.url, i, 2, acked) for i in range(32)])

        asyncio.run(main())
        assert drift.store.count("turns") == len(acked) == 64
        assert drift.store.count("projections") == 128 and drift.store.count("conversations") == 32
        rec = httpx.get(srv.url + "/v1/conversations/c3").json()
        metrics = httpx.get(srv.url + "/metrics").text
        listing = httpx.get(srv.url + "/v1/conversations?limit=5").json()
        assert httpx.get(srv.url + "/v1/conversations/nope").status_code == 404
    assert [t["turn"] for t in rec["turn_records"]] == [0, 1] and rec["alerts"] == []
    assert len(listing["data"]) == 5 and set(listing["data"][0]["series"]) == {"opt", "hum"}
    # the server's pre-turn projection is the offline primitive's (same prompt, same layer)
    dvs = list(drift.vectors.values())
    for cid, t, rid, msgs in acked:
        if cid != "c3":
            continue
        point = trajectory(engine.adapter, msgs, dvs).turns[-1]
        saved = rec["turn_records"][t]
        assert saved["request_id"] == rid
        for name in ("opt", "hum"):
            assert saved["projections"][name]["pre"] == pytest.approx(point.pre[name], abs=1e-3)
        assert saved["projections"]["opt"]["pre_z"] == pytest.approx(point.pre_z["opt"], abs=1e-2)
    fams = {f.name: f for f in text_string_to_metric_families(metrics)}
    assert fams["personascope_drift_records"].samples[0].value == 64
    count = [s.value for s in fams["personascope_request_latency_seconds"].samples if s.name.endswith("_count")]
    assert sum(count) == 64
    assert any(s.labels.get("vector") == "opt" for s in fams["personascope_drift_projection_z"].samples)


def test_alert_engages_the_auto_guard_from_the_next_turn(vectors, tmp_path):
    engine, drift = _service(vectors, tmp_path / "g.sqlite3", DriftRule(z=-1e9, turns=1), auto_guard="cap",
                             names=("opt",))
    from personascope.serve import create_app

    with ThreadServer(create_app(engine, drift)) as srv:
        msgs = [{"role": "user", "content": "hi"}]
        first = httpx.post(srv.url + "/v1/chat/completions", json={"model": MODEL, "messages": msgs,
                                                                     "max_tokens": 8, "temperature": 0}).json()
        assert "guard" not in first  # the alert comes with turn 0; the guard acts from turn 1
        msgs += [first["choices"][0]["message"], {"role": "user", "content": "more"}]
        second = httpx.post(srv.url + "/v1/chat/completions", json={"model": MODEL, "messages": msgs,
                                                                      "max_tokens": 8, "temperature": 0}).json()
        listing = httpx.get(srv.url + "/v1/conversations").json()["data"]
        metrics = httpx.get(srv.url + "/metrics").text
        rec = httpx.get(srv.url + f"/v1/conversations/{listing[0]['id']}").json()
    assert listing[0]["id"].startswith("h-") and len(listing) == 1  # hashed id: both turns in one conversation
    assert second["guard"]["mode"] == "cap" and second["guard"]["vector"] == "opt"
    assert [(a["vector"], a["turn"], a["guard_mode"]) for a in rec["alerts"]] == [("opt", 0, "cap")]
    assert rec["alert_turn"] == 0 and rec["guard_mode"] == "cap" and rec["guard_vector"] == "opt"
    assert [t["guard_mode"] for t in rec["turn_records"]] == [None, "auto:cap"]
    assert rec["turn_records"][1]["guarded_tokens"] == second["guard"]["touched"]
    assert 'personascope_drift_alerts_total{reason="run",vector="opt"} 1.0' in metrics
    assert 'personascope_drift_auto_guard_turns_total{mode="cap",vector="opt"} 1.0' in metrics


def test_sigkill_mid_load_keeps_every_acknowledged_turn(vectors, tmp_path):
    db = tmp_path / "k.sqlite3"
    port = free_port()
    proc = subprocess.Popen([*CLI, "serve", "--model", MODEL, "--vector", f"opt={vectors['opt']}", "--monitor",
                             "opt", "--drift-db", str(db), "--port", str(port), "--max-batch", "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        acked: list = []

        async def one(client, i):
            try:
                r = await client.post(url + "/v1/chat/completions", json={
                    "model": MODEL, "conversation_id": f"k{i}", "max_tokens": 8, "temperature": 0,
                    "messages": [{"role": "user", "content": f"q{i}"}]})
                if r.status_code == 200:
                    acked.append(r.json()["id"])
            except httpx.HTTPError:
                pass

        async def load():
            async with httpx.AsyncClient(timeout=60) as client:
                tasks = [asyncio.create_task(one(client, i)) for i in range(200)]
                while len(acked) < 20:
                    await asyncio.sleep(0.05)
                os.kill(proc.pid, signal.SIGKILL)
                await asyncio.gather(*tasks)

        asyncio.run(load())
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    saved = {r[0] for r in conn.execute("SELECT request_id FROM turns")}
    assert len(acked) >= 20 and set(acked) <= saved


def _serve_error(args: list[str]) -> str:
    res = subprocess.run([*CLI, "serve", "--model", MODEL, "--port", str(free_port()), *args], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.strip() and not ln.startswith("loading")]
    assert "Traceback" not in res.stdout + res.stderr
    return lines[-1]


def test_startup_errors_are_one_line(vectors, tmp_path):
    line = _serve_error(["--vector", f"opt={vectors['opt']}", "--monitor", "opt,nope"])
    assert line.startswith("error: --monitor nope")
    line = _serve_error(["--vector", f"opt={vectors['opt']}", "--monitor", "opt", "--drift-db",
                         "postgresql://u:secret@127.0.0.1:1/none"])
    assert line.startswith("error: cannot open the drift database postgresql://u:***@127.0.0.1:1/none")
    line = _serve_error(["--vector", f"hum={vectors['hum']}", "--monitor", "hum", "--auto-guard", "cap",
                         "--drift-calibrate", "0", "--drift-db", str(tmp_path / "e.sqlite3")])
    assert "hum" in line and "guard calibrate" in line
