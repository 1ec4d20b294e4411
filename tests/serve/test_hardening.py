"""Hostile clients and operators against the real server on loopback: numbers Python cannot hold, walked-around
strength limits, bodies that are not UTF-8, stalled bodies, huge prompts, SIGTERM, bad options, bad vector files."""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from servers import KEY, MODEL, ThreadServer, free_port, start_server, tiny_vectors
from typer.testing import CliRunner

from personascope.serve import Engine, ServeConfig, create_app, load_serving_model
from personascope.vectors.file import PersonaVector, VectorFileError, load_vector

AUTH = {"Authorization": f"Bearer {KEY}"}
HUGE = "1" + "0" * 400  # 10**400: no float holds it
DIGITS = "9" * 5000  # past Python's 4,300-digit limit for int(str)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return tiny_vectors(tmp_path_factory.mktemp("hardening"))


@pytest.fixture(scope="module")
def srv(paths):
    vecs = {name: load_vector(p) for name, p in paths.items()}
    engine = Engine(load_serving_model(MODEL), vecs, ServeConfig(api_key=KEY, max_tokens_limit=64, body_timeout_s=1.0),
                    model_id=MODEL)
    with ThreadServer(create_app(engine)) as server:
        yield server.url, engine


def post_raw(url: str, raw: str | bytes, content_type: str = "application/json", timeout: float = 60) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", content=raw.encode() if isinstance(raw, str) else raw,
                      headers={**AUTH, "Content-Type": content_type}, timeout=timeout)


def raw_body(fragment: str, content: str = '"hi"') -> str:
    """A body's text with one message of raw JSON `content` and a raw JSON `fragment` of fields."""
    return '{"model": "' + MODEL + '", "messages": [{"role": "user", "content": ' + content + "}]" + \
        (", " + fragment if fragment else "") + "}"


def body(**extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, **extra}


# (a JSON fragment spliced into a valid body, the param the 400 must name)
UNHOLDABLE = [
    (f'"temperature": {HUGE}', "temperature"),
    (f'"top_p": {HUGE}', "top_p"),
    (f'"max_tokens": {DIGITS}', "max_tokens"),
    (f'"seed": {DIGITS}', "seed"),
    (f'"seed": {2**70}', "seed"),
    (f'"n": {DIGITS}', "n"),
    (f'"top_logprobs": {DIGITS}, "logprobs": true', "top_logprobs"),
    (f'"steering": [{{"vector": "opt", "layer": 2, "alpha": {HUGE}}}]', "steering[0].alpha"),
    (f'"steering": [{{"vector": "opt", "layer": 2, "coef": -{HUGE}}}]', "steering[0].coef"),
    (f'"steering": [{{"vector": "opt", "layer": {DIGITS}, "coef": 1}}]', "steering[0].layer"),
    (f'"guard": {{"vector": "opt", "mode": "cap", "hi": {HUGE}}}', "guard.hi"),
    (f'"guard": {{"vector": "opt", "mode": "cap", "lo": -{HUGE}, "hi": 1}}', "guard.lo"),
    (f'"guard": {{"vector": "opt", "mode": "conditional", "hi": 1, "alpha": {HUGE}}}', "guard.alpha"),
    (f'"monitor": {{"vectors": ["opt"], "layer": {DIGITS}}}', "monitor.layer"),
    ('"stop": ["ok", "\\udc00"]', "stop[1]"),
]


@pytest.mark.parametrize("fragment, param", UNHOLDABLE)
def test_numbers_python_cannot_hold_are_a_400_naming_the_field(srv, fragment, param):
    url, engine = srv
    r = post_raw(url, raw_body(fragment))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert len(r.json()["error"]["message"]) < 300  # the 5,000 digits are not echoed back


def test_lone_surrogates_are_a_400_naming_the_field(srv):
    url, _ = srv
    for content, param in (('"\\ud800"', "messages[0].content"), ('"ok \\udfff ok"', "messages[0].content"),
                           ('[{"type": "text", "text": "\\ud800"}]', "messages[0].content[0].text")):
        r = post_raw(url, raw_body("", content))
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = post_raw(url, raw_body("", '"hi", "\\ud800": 1'))
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0] (a key)"
    # a surrogate pair is a real character and stays one
    r = post_raw(url, raw_body('"max_tokens": 2', '"\\ud83d\\ude00"'))
    assert r.status_code == 200, r.text


def test_nan_and_infinity_literals_are_not_json(srv):
    url, _ = srv
    for literal in ("NaN", "Infinity", "-Infinity"):
        r = post_raw(url, json.dumps(body()).replace('"max_tokens": 3', f'"temperature": {literal}'))
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text


def test_strength_limits_cannot_be_walked_around(srv):
    url, engine = srv
    post = lambda **kw: httpx.post(url + "/v1/chat/completions", json=body(**kw), headers=AUTH, timeout=60)  # noqa: E731
    # a thousand small entries on one vector (sum α 10) and an unbounded list
    r = post(steering=[{"vector": "opt", "layer": 2, "alpha": 0.01}] * 1000)
    assert r.status_code == 400 and r.json()["error"]["param"] == "steering", r.text
    # 16 entries are allowed, but their strength adds up per layer: Σ|α| ≤ 10
    r = post(steering=[{"vector": "opt", "layer": 2, "alpha": 0.7}] * 16)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "steering[14].alpha" and err["code"] == "invalid_coefficient" and "Σ" in err["message"]
    r = post(steering=[{"vector": "opt", "layer": 2, "alpha": 6}, {"vector": "hum", "layer": 2, "coef": -6}])
    assert r.status_code == 400 and r.json()["error"]["param"] == "steering[1].coef", r.text
    assert post(steering=[{"vector": "opt", "layer": 2, "alpha": 6}, {"vector": "hum", "layer": 1, "coef": -6}]
                ).status_code == 200
    assert post(steering=[{"vector": "opt", "layer": 2, "alpha": 0.6}] * 16).status_code == 200
    # the guard's conditional steering has the same limit, alone and together with steering at its layer
    for key, value in (("alpha", 1e6), ("coef", 1e6), ("alpha", -10.5), ("coef", 11)):
        r = post(guard={"vector": "opt", "mode": "conditional", "hi": 0.0, key: value})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == f"guard.{key}" and r.json()["error"]["code"] == "invalid_coefficient"
    r = post(guard={"vector": "opt", "mode": "conditional", "hi": 0.0, "alpha": -5},
             steering=[{"vector": "opt", "layer": 2, "alpha": 6}])
    assert r.status_code == 400 and r.json()["error"]["param"] == "guard.alpha", r.text
    assert post(guard={"vector": "opt", "mode": "conditional", "hi": 0.0, "alpha": -5}).status_code == 200
    assert engine.stats["errors"] == 0


def test_bodies_that_are_not_utf8_are_refused(srv):
    url, _ = srv
    text = json.dumps(body(messages=[{"role": "user", "content": "héllo wörld"}]), ensure_ascii=False)
    cases = [
        (text.encode("utf-16"), "application/json"),  # with its BOM
        (text.encode("utf-16-le"), "application/json"),
        (text.encode("utf-32"), "application/json"),
        (b"\xef\xbb\xbf" + text.encode(), "application/json"),  # a UTF-8 byte order mark
        (text.encode("latin-1"), "application/json"),
        (text.encode("utf-16"), "application/json; charset=utf-16"),
        (text.encode(), "application/json; charset=latin-1"),
    ]
    for raw, ctype in cases:
        r = post_raw(url, raw, ctype)
        assert r.status_code == 400, (raw[:8], ctype, r.text)
        assert r.json()["error"]["code"] == "invalid_json"
    for ctype in ("application/json", "application/json; charset=UTF-8", 'application/json; charset="utf-8"'):
        r = post_raw(url, text.encode(), ctype)
        assert r.status_code == 200, (ctype, r.text)
    assert "UTF-8" in post_raw(url, text.encode("utf-16")).json()["error"]["message"]


def test_the_default_max_tokens_fits_what_the_context_leaves():
    adapter = load_serving_model(MODEL)
    adapter.model.config.max_position_embeddings = 256
    engine = Engine(adapter, {}, ServeConfig(), model_id=MODEL)
    with ThreadServer(create_app(engine)) as server:
        def ask(text: str, **kw) -> httpx.Response:
            payload = {"model": MODEL, "messages": [{"role": "user", "content": text}], "temperature": 0, **kw}
            return httpx.post(server.url + "/v1/chat/completions", json=payload, timeout=120)

        r = ask("Write a long story.")
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert usage["total_tokens"] <= 256
        prompt = len(adapter.encode_prompt(adapter.prompt("x" * 220)))
        r = ask("x" * 220)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == prompt and r.json()["usage"]["total_tokens"] <= 256
        r = ask("x" * 300)  # no room left for an answer
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert "context is 256" in r.json()["error"]["message"]
        r = ask("Write a long story.", max_tokens=250)  # an explicit max_tokens is still checked
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_a_stalled_body_is_a_408_and_holds_nothing(srv):
    url, engine = srv
    port = int(url.rsplit(":", 1)[1])
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n").encode()
    socks = []
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(head + b'{"model": "')  # half a body, then nothing
        s.settimeout(10)
        socks.append(s)
    t0 = time.monotonic()
    health = httpx.get(url + "/health", timeout=5)
    assert health.status_code == 200 and time.monotonic() - t0 < 1.0
    for s in socks:
        reply = b""
        while chunk := s.recv(65536):  # the server answers, then closes the connection
            reply += chunk
        s.close()
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    assert time.monotonic() - t0 < 8
    assert httpx.get(url + "/health").json()["pending"] == 0
    assert httpx.post(url + "/v1/chat/completions", json=body(), headers=AUTH, timeout=60).status_code == 200


def test_huge_prompts_are_tokenised_off_the_event_loop(paths):
    engine = Engine(load_serving_model(MODEL), {}, ServeConfig(max_body_bytes=1_000_000), model_id=MODEL)
    with ThreadServer(create_app(engine)) as server:
        big = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x y z " * 100_000}]})
        assert len(big) < 1_000_000
        done = threading.Event()
        lags: list[float] = []

        def probe() -> None:
            while not done.is_set():
                t0 = time.monotonic()
                assert httpx.get(server.url + "/health", timeout=30).status_code == 200
                lags.append(time.monotonic() - t0)
                time.sleep(0.05)

        prober = threading.Thread(target=probe)
        prober.start()
        with ThreadPoolExecutor(2) as pool:
            codes = list(pool.map(lambda _: post_raw(server.url, big, timeout=120).status_code, range(2)))
        done.set()
        prober.join()
    assert codes == [400] * 2  # tokenised (context_length_exceeded): each took ~1-3 s of tokenizer time
    # on the loop the two prompts stalled /health for their whole tokenising (seconds: one or two probes in all)
    assert len(lags) >= 10 and max(lags) < 2.0, lags


def test_sigterm_drains_then_ends_open_requests_in_the_protocols_shape(paths):
    # one batch (a long window gathers all three): the short answer finishes within the drain, the long ones cannot
    # (a 2 s drain: 4,000 tokens cannot finish in it even on an idle machine, 40 can on a loaded one)
    proc, base = start_server(["--model", MODEL, "--api-key", KEY, "--max-tokens-limit", "4000",
                               "--drain-timeout-s", "2", "--batch-wait-ms", "2000"])
    long = {"model": MODEL, "messages": [{"role": "user", "content": "Write a long story."}], "temperature": 0,
            "max_tokens": 4000}
    results: dict[str, object] = {}
    started = threading.Event()

    def whole() -> None:
        results["whole"] = httpx.post(base + "/v1/chat/completions", json=long, headers=AUTH, timeout=60)

    def streamed(name: str, max_tokens: int) -> None:
        lines = []
        with httpx.stream("POST", base + "/v1/chat/completions", json={**long, "stream": True,
                          "max_tokens": max_tokens}, headers=AUTH, timeout=60) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                    started.set()
        results[name] = lines

    try:
        threads = [threading.Thread(target=whole), threading.Thread(target=streamed, args=("stream", 4000)),
                   threading.Thread(target=streamed, args=("short", 40))]
        for t in threads:
            t.start()
        assert started.wait(60)
        t0 = time.monotonic()
        proc.terminate()  # SIGTERM
        for t in threads:
            t.join(60)
        assert proc.wait(30) in (0, -15)  # uvicorn re-raises the signal once it has shut down
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    short = results["short"]
    assert short[-1] == "data: [DONE]" and "error" not in short[-2], short[-3:]  # finished within the drain
    assert json.loads(short[-2].removeprefix("data: "))["choices"][0]["finish_reason"] in ("stop", "length")
    r = results["whole"]
    assert r.status_code == 503 and r.headers["content-type"] == "application/json", r.text
    assert r.json()["error"]["code"] == "server_shutting_down"
    lines = results["stream"]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2].removeprefix("data: "))["error"]["code"] == "server_shutting_down"
    assert 1.5 < elapsed < 30, elapsed


def test_health_reflects_the_engine_thread():
    engine = Engine(load_serving_model(MODEL), {}, ServeConfig(), model_id=MODEL)
    with ThreadServer(create_app(engine)) as server:
        assert httpx.get(server.url + "/health").json()["engine"] == "running"
        engine.config.batch_wait_ms = math.inf  # the worker dies on the next batch (queue.get(timeout=inf))
        r = httpx.post(server.url + "/v1/chat/completions", json=body(), timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_stopped", r.text
        h = httpx.get(server.url + "/health")
        assert h.status_code == 503 and h.json()["status"] == "engine stopped"
        assert "OverflowError" in h.json()["engine"]
        r = httpx.post(server.url + "/v1/chat/completions", json=body(), timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_stopped"
        assert engine.pending == 0


def _serve(args: list[str], monkeypatch) -> tuple[int, list[str]]:
    """`personascope serve ARGS` in-process (the server itself never starts): exit code and output lines."""
    import personascope.serve as serve
    from personascope.cli.main import app

    def started(*a, **kw):
        raise AssertionError("the server started")

    monkeypatch.setattr(serve, "run_server", started)
    res = CliRunner().invoke(app, ["serve", "--model", MODEL, *args], env={"COLUMNS": "200"})
    return res.exit_code, [line for line in res.output.splitlines() if line.strip()]


@pytest.mark.parametrize("args, option", [
    (["--max-batch", "0"], "--max-batch"),
    (["--max-tokens-limit", "0"], "--max-tokens-limit"),
    (["--max-queue", "-1"], "--max-queue"),
    (["--max-queue", "0"], "--max-queue"),
    (["--max-body-bytes", "-1"], "--max-body-bytes"),
    (["--batch-wait-ms", "inf"], "--batch-wait-ms"),
    (["--batch-wait-ms", "nan"], "--batch-wait-ms"),
    (["--batch-wait-ms", "-5"], "--batch-wait-ms"),
    (["--body-timeout-s", "0"], "--body-timeout-s"),
    (["--drain-timeout-s", "-1"], "--drain-timeout-s"),
    (["--port", "70000"], "--port"),
    (["--port", "0"], "--port"),
])
def test_useless_serve_options_are_refused_at_start(monkeypatch, args, option):
    code, lines = _serve(args, monkeypatch)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: ") and option in lines[0]


def test_busy_port_and_unknown_host_are_one_error_line(monkeypatch):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, lines = _serve(["--port", str(port)], monkeypatch)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: cannot listen on 127.0.0.1:"), lines
    code, lines = _serve(["--host", "no-such-host.invalid", "--port", str(free_port())], monkeypatch)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: cannot listen on no-such-host"), lines


BAD_GUARD = [
    ("{not json", "is not valid JSON"),
    ('{"layer": 2, "lo": 0.0, "percentile": 95, "n": 10}', "lacks hi"),
    ('{"layer": 99, "lo": 0.0, "hi": 1.0, "percentile": 95, "n": 10}', "layer 99"),
    ('{"layer": 2, "lo": 0.0, "hi": NaN, "percentile": 95, "n": 10}', "hi nan"),
    ('{"layer": 2, "lo": 2.0, "hi": 1.0, "percentile": 95, "n": 10}', "lo 2.0 is above hi"),
    ('{"layer": 2, "lo": 0.0, "hi": "1", "percentile": 95, "n": 10}', "hi '1'"),
    ("[1, 2]", "must be a JSON object"),
]
BAD_VALIDITY = [
    ("{oops", "is not valid JSON"),
    ('{"layers": [0, 1], "held_out_auroc": [0.5], "split_half_cosine": [0.1, 0.2]}', "held_out_auroc"),
    ('{"layers": "all", "held_out_auroc": [], "split_half_cosine": []}', "layers"),
    ('{"layers": [1], "held_out_auroc": [0.5], "split_half_cosine": [0.5], "layer": 3}', "layer 3"),
]


def _vector_with(folder, key: str, raw: str, i: int):
    adapter = load_serving_model(MODEL)
    v = torch.ones(adapter.n_layers + 1, adapter.hidden_size)
    from personascope.vectors.file import base_metadata

    pv = PersonaVector({"response_avg": v}, torch.full((adapter.n_layers + 1,), 4.0),
                       {**base_metadata(adapter, "opt"), key: raw})
    return pv.save(folder / f"bad-{key}-{i}.safetensors")


@pytest.mark.parametrize("key, raw, words", [("guard", *c) for c in BAD_GUARD] +
                         [("validity", *c) for c in BAD_VALIDITY])
def test_malformed_vector_metadata_is_refused_on_load(tmp_path, monkeypatch, key, raw, words):
    path = _vector_with(tmp_path, key, raw, abs(hash(raw)))
    with pytest.raises(VectorFileError) as e:
        load_vector(path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message and f"'{key}'" in message and words in message, message
    code, lines = _serve(["--vector", f"opt={path}", "--port", str(free_port())], monkeypatch)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and f"'{key}'" in lines[0], lines


def test_vector_info_on_bad_validity_is_one_line(tmp_path):
    from personascope.cli.main import app

    path = _vector_with(tmp_path, "validity", "{oops", 0)
    res = CliRunner().invoke(app, ["vector", "info", str(path)], env={"COLUMNS": "200"})
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and "'validity'" in lines[0], res.output


def test_the_calibrated_vectors_of_the_tests_still_load(paths):
    assert load_vector(paths["opt"]).metadata["guard"]
