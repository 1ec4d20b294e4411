"""`personascope serve` end to end: a real server process on 127.0.0.1, driven with the openai SDK and httpx."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from servers import CLI, GUARD_QUESTIONS, KEY, MODEL, ThreadServer, free_port, start_server, stop_server, tiny_vectors  # noqa: F401

from personascope.model.activations import collect_spans, project
from personascope.serve import load_serving_model
from personascope.steering.calibration import GuardCalibration
from personascope.steering.guard import Guard
from personascope.vectors.file import PersonaVector, load_vector


@pytest.fixture(scope="module")
def vectors(tmp_path_factory):
    return tiny_vectors(tmp_path_factory.mktemp("vectors"))


@pytest.fixture(scope="module")
def server(vectors):
    vecs = vectors
    proc, base = start_server(["--model", MODEL, "--vector", f"opt={vecs['opt']}", "--vector", f"hum={vecs['hum']}",
                               "--api-key", KEY, "--max-tokens-limit", "64", "--max-body-bytes", "20000",
                               "--max-batch", "8", "--batch-wait-ms", "30"])
    yield base
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


def chat(client, text: str = "Tell me about the sea.", **kw):
    kw.setdefault("max_tokens", 16)
    kw.setdefault("temperature", 0)
    extra = {k: kw.pop(k) for k in ("steering", "monitor", "guard") if k in kw}
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}],
                                          extra_body=extra or None, **kw)


def test_models_and_auth(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(server + "/v1/chat/completions", json={"model": MODEL, "messages": []}, headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
    info = httpx.get(server + "/v1/vectors", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert [v["name"] for v in info["vectors"]] == ["opt", "hum"]
    assert info["vectors"][0]["default_layer"] == 2


def test_completion_fields_and_logprobs(client):
    r = chat(client, logprobs=True, top_logprobs=5)
    ch = r.choices[0]
    assert isinstance(ch.message.content, str) and ch.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens == len(ch.logprobs.content) <= 16
    assert r.usage.prompt_tokens > 0
    for entry in ch.logprobs.content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 5 and tops == sorted(tops, reverse=True)
        assert entry.logprob == pytest.approx(tops[0], abs=1e-5)  # greedy picks the top token
    joined = "".join(e.token for e in ch.logprobs.content if e.token != "<|im_end|>")
    assert joined == ch.message.content


def test_streaming_matches_non_streaming(client):
    full = chat(client, max_tokens=24)
    chunks = list(chat(client, max_tokens=24, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    # n choices stream interleaved, told apart by index
    two = chat(client, max_tokens=10, temperature=1.0, seed=11, n=2)
    parts = {0: "", 1: ""}
    for c in chat(client, max_tokens=10, temperature=1.0, seed=11, n=2, stream=True):
        for ch in c.choices:
            parts[ch.index] += ch.delta.content or ""
    assert [parts[0], parts[1]] == [c.message.content for c in two.choices]


def test_seed_and_n(client):
    a = chat(client, temperature=1.0, seed=7, n=3)
    b = chat(client, temperature=1.0, seed=7, n=3)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in b.choices]
    assert len(set(texts)) > 1  # each choice samples with its own stream
    # top_p near 0 keeps only the most likely token: sampling becomes greedy
    greedy = chat(client, max_tokens=12).choices[0].message.content
    assert chat(client, max_tokens=12, temperature=1.5, top_p=1e-6, seed=3).choices[0].message.content == greedy


def test_stop_strings(client):
    text = chat(client, max_tokens=30).choices[0].message.content
    assert len(text) > 8
    stop = text[4:7]
    want = text[: text.find(stop)]
    for stream in (False, True):
        if stream:
            got = "".join(c.choices[0].delta.content or "" for c in chat(client, max_tokens=30, stop=[stop],
                                                                          stream=True) if c.choices)
        else:
            r = chat(client, max_tokens=30, stop=[stop, "never-appears"])
            got = r.choices[0].message.content
            assert r.choices[0].finish_reason == "stop"
        assert got == want


STEER_CASES = [
    {},
    {"steering": [{"vector": "opt", "layer": 2, "coef": 3.0}]},
    {"steering": [{"vector": "opt", "layer": 2, "coef": -3.0}]},
    {"steering": [{"vector": "hum", "layer": 1, "alpha": 0.8, "positions": "all"}]},
    {"steering": [{"vector": "opt", "coef": 2.0}, {"vector": "hum", "layer": 3, "coef": -2.0}]},
    {"monitor": {"vectors": ["opt", "hum"], "layer": 2}},
    {"steering": [{"vector": "hum", "layer": 2, "coef": 4.0, "positions": "prompt"}]},
    {"steering": [{"vector": "opt", "layer": 0, "coef": 3.0}]},
]


def test_concurrent_steering_equals_sequential(server, client):
    prompts = ["Tell me about the sea.", "How do I bake bread?"]
    cases = [(p, c) for p in prompts for c in STEER_CASES]
    sequential = [chat(client, p, max_tokens=20, **c).choices[0].message.content for p, c in cases]
    assert len(set(sequential[: len(STEER_CASES)])) >= 5  # steering changes the (greedy) answers
    before = httpx.get(server + "/health").json()
    barrier = threading.Barrier(len(cases))

    def together(case):
        barrier.wait()
        return chat(client, case[0], max_tokens=20, **case[1]).choices[0].message.content

    with ThreadPoolExecutor(len(cases)) as pool:
        concurrent = list(pool.map(together, cases))
    assert concurrent == sequential
    after = httpx.get(server + "/health").json()
    assert after["max_batch_rows"] > 1 and after["batches"] - before["batches"] < len(cases)
    # seeded sampling is per row too: batched equals alone
    sampled = [chat(client, p, max_tokens=12, temperature=1.0, seed=5, **c).choices[0].message.content
               for p, c in cases[:4]]
    with ThreadPoolExecutor(4) as pool:
        again = list(pool.map(lambda pc: chat(client, pc[0], max_tokens=12, temperature=1.0, seed=5, **pc[1])
                              .choices[0].message.content, cases[:4]))
    assert again == sampled


def test_monitor_values(client, vectors):
    adapter = load_serving_model(MODEL)
    text = "How do I bake bread?"
    mon = {"vectors": ["opt", "hum"], "layer": 2}
    r = chat(client, text, max_tokens=10, monitor=mon)
    head = r.model_extra["monitor"]
    per = r.choices[0].model_extra["monitor"]
    assert head["layer"] == 2 and set(head["prompt"]) == {"opt", "hum"}
    assert head["scale"]["opt"]["norm"] == pytest.approx(4.0, rel=1e-5)
    assert len(per["tokens"]) == len(per["projections"]["opt"]) >= 1
    assert "".join(per["tokens"]) == r.choices[0].message.content
    # the prompt value is the last prompt token's projection on v̂ at layer 2, as computed offline
    ids = adapter.encode_prompt(adapter.prompt(text))
    spans, _ = collect_spans(adapter, [(ids, [])], layers=[2])
    for name in ("opt", "hum"):
        want = float(project(spans["prompt_last"][0, 0], load_vector(vectors[name]).vector(2)))
        assert head["prompt"][name] == pytest.approx(want, abs=1e-4)
    # the monitor reads layer 2 before steering there is added; steering lower down moves it
    same = chat(client, text, max_tokens=2, monitor=mon, steering=[{"vector": "opt", "layer": 2, "coef": 1.5}])
    assert same.model_extra["monitor"]["prompt"] == pytest.approx(head["prompt"], abs=1e-4)
    assert same.model_extra["steering"][0]["coef"] == 1.5
    lower = chat(client, text, max_tokens=2, monitor=mon, steering=[{"vector": "opt", "layer": 1, "coef": 1.5}])
    assert abs(lower.model_extra["monitor"]["prompt"]["opt"] - head["prompt"]["opt"]) > 1e-2
    # streaming carries the same numbers chunk by chunk
    chunks = list(chat(client, text, max_tokens=10, monitor=mon, stream=True))
    assert chunks[0].model_extra["monitor"]["prompt"] == pytest.approx(head["prompt"])
    streamed = [x for c in chunks if c.choices and c.choices[0].model_extra.get("monitor")
                for x in c.choices[0].model_extra["monitor"]["projections"]["hum"]]
    assert streamed == pytest.approx(per["projections"]["hum"], abs=1e-5)


@pytest.mark.parametrize("body, status, param, code", [
    ({"steering": [{"vector": "nope", "coef": 1}]}, 400, "steering[0].vector", "unknown_vector"),
    ({"steering": [{"vector": "opt", "layer": 99, "coef": 1}]}, 400, "steering[0].layer", "layer_out_of_range"),
    ({"steering": [{"vector": "opt", "coef": "big"}]}, 400, "steering[0].coef", "invalid_coefficient"),
    ({"steering": [{"vector": "opt", "coef": 1e9}]}, 400, "steering[0].coef", "invalid_coefficient"),
    ({"steering": [{"vector": "opt"}]}, 400, "steering[0]", "invalid_value"),
    ({"steering": [{"vector": "opt", "coef": 1, "positions": "middle"}]}, 400, "steering[0].positions", None),
    ({"monitor": {"vectors": ["opt"], "layer": -1}}, 400, "monitor.layer", "layer_out_of_range"),
    ({"monitor": {"vectors": []}}, 400, "monitor.vectors", None),
    ({"max_tokens": 5000}, 400, "max_tokens", None),
    ({"temperature": 7}, 400, "temperature", None),
    ({"top_logprobs": 50, "logprobs": True}, 400, "top_logprobs", None),
    ({"n": 0}, 400, "n", None),
    ({"stop": [1, 2]}, 400, "stop", None),
    ({"model": "gpt-9"}, 404, "model", "model_not_found"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", None),
    ({"messages": "hi"}, 400, "messages", None),
])
def test_errors_are_openai_style(server, body, status, param, code):
    payload = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body}
    r = httpx.post(server + "/v1/chat/completions", json=payload, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    if code is not None:
        assert err["code"] == code


def test_malformed_and_oversized_bodies_then_still_serving(server, client):
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(server + "/v1/chat/completions", content=b'{"model": "x", "messages": [', headers=auth)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(server + "/v1/chat/completions", content=b"[1, 2]", headers=auth)
    assert r.status_code == 400
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 30000}]}
    r = httpx.post(server + "/v1/chat/completions", json=big, headers=auth)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, steering=[{"vector": "missing", "coef": 1}])
    assert "missing" in e.value.body["message"]
    r = httpx.get(server + "/v1/nowhere", headers=auth)
    assert r.status_code == 404 and "error" in r.json()
    assert chat(client, max_tokens=3).choices[0].message.content is not None
    assert httpx.get(server + "/health").json()["errors"] == 0


def test_mismatched_vector_is_refused_at_startup(tmp_path):
    from typer.testing import CliRunner

    from personascope.cli.main import app

    pv = PersonaVector({"response_avg": torch.randn(4, 16)}, None, {"trait": "evil", "model": "other"})
    path = pv.save(tmp_path / "evil.safetensors")
    res = CliRunner().invoke(app, ["serve", "--model", MODEL, "--vector", f"evil={path}", "--port", str(free_port())],
                             env={"COLUMNS": "200"})
    assert res.exit_code == 2
    assert "hidden size 16" in res.output
    res = CliRunner().invoke(app, ["serve", "--model", MODEL, "--vector", f"bad name={path}"], env={"COLUMNS": "200"})
    assert res.exit_code == 2 and "vector name" in res.output


def test_detokenizing_waits_for_whole_characters_and_holds_stop_prefixes():
    from tiny import tiny_pair

    from personascope.model.adapter import ModelAdapter
    from personascope.serve import ChatRequest, Engine, Job, Row

    engine = Engine(ModelAdapter(*tiny_pair("qwen2")))
    text = "héllo wörld, bye"
    ids = engine.adapter.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode())  # one token per byte: 'é' and 'ö' take two tokens each
    row = Row(engine, Job(ChatRequest("m", [1], max_tokens=len(ids) + 5, stop=["wörld!", ", b"])), 0)
    pieces = []
    for t in ids:
        row.accept(t, None)
        pieces.append(row._pending[0])
        row.flush({"v": 0.0})
        if row.finished:
            break
    assert "\ufffd" not in "".join(pieces)
    assert pieces[1] == "" and pieces[2] == "é"  # the first byte of 'é' releases nothing
    assert "".join(pieces) == "héllo wörld" and row.reason == "stop"


def test_a_dropped_stream_frees_the_server(server, client):
    auth = {"Authorization": f"Bearer {KEY}"}
    payload = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64, "stream": True,
               "temperature": 1.0, "seed": 1}
    with httpx.stream("POST", server + "/v1/chat/completions", json=payload, headers=auth) as r:
        first = next(r.iter_lines())
        assert first.startswith("data: ")
    deadline = time.monotonic() + 10
    while httpx.get(server + "/health").json()["pending"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(server + "/health").json()["pending"] == 0
    assert chat(client, max_tokens=3).choices[0].message.content is not None


@torch.no_grad()
def _offline_guarded(text: str, guard_fn, max_tokens: int) -> tuple[str, list[bool]]:
    """The greedy answer under a Guard built offline (HF generate), and per token whether the guard acted."""
    adapter = load_serving_model(MODEL)
    guard = guard_fn(adapter)
    ids = torch.tensor([adapter.encode_prompt(adapter.prompt(text))])
    with guard:
        out = adapter.model.generate(input_ids=ids, max_new_tokens=max_tokens, do_sample=False,
                                     pad_token_id=adapter.tokenizer.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    return adapter.tokenizer.decode(new, skip_special_tokens=True), guard.last.fired[0][: len(new)]


def test_guard_matches_offline_and_reports_touched_tokens(client, vectors):
    text = "Tell me about the sea."
    cal = GuardCalibration.from_vector(load_vector(vectors["opt"]))
    r = chat(client, text, max_tokens=16, guard={"vector": "opt", "mode": "cap"})  # the calibrated layer and hi
    echo = r.model_extra["guard"]
    assert (echo["layer"], echo["hi"], echo["mode"]) == (2, pytest.approx(cal.hi), "cap")
    per = r.choices[0].model_extra["guard"]
    want_text, want_fired = _offline_guarded(text, lambda a: Guard(a).cap(load_vector(vectors["opt"]), 2,
                                                                          hi=cal.hi), 16)
    assert r.choices[0].message.content == want_text
    assert per["fired"] == want_fired and per["touched"] == sum(want_fired) == echo["touched"]
    assert 0 < per["touched"] < len(per["fired"]) == r.usage.completion_tokens
    # conditional steering on the other vector with an explicit threshold, streamed: the same flags chunk by chunk
    g = {"vector": "hum", "layer": 2, "mode": "conditional", "threshold": 0.0, "coef": -6.0}
    full = chat(client, text, max_tokens=12, guard=g)
    chunks = list(chat(client, text, max_tokens=12, guard=g, stream=True))
    fired = [f for c in chunks if c.choices and c.choices[0].model_extra.get("guard")
             for f in c.choices[0].model_extra["guard"]["fired"]]
    assert fired == full.choices[0].model_extra["guard"]["fired"]
    last = [c for c in chunks if c.choices and c.choices[0].finish_reason][0]
    assert last.choices[0].model_extra["guard"]["touched"] == sum(fired)
    hum = load_vector(vectors["hum"])
    want_text, want_fired = _offline_guarded(text, lambda a: Guard(a).conditional(hum, 2, 0.0, hum, 2, -6.0), 12)
    assert full.choices[0].message.content == want_text and fired == want_fired


def test_guarded_rows_batch_with_others(server, client):
    cases = [{"guard": {"vector": "opt", "mode": "cap"}}, {},
             {"guard": {"vector": "hum", "layer": 1, "mode": "conditional", "hi": 0.0}},
             {"steering": [{"vector": "opt", "layer": 2, "coef": 3.0}], "guard": {"vector": "opt", "mode": "cap"}},
             {"guard": {"vector": "opt", "mode": "conditional", "alpha": -0.5}}]
    prompts = ["Tell me about the sea.", "How do I bake bread?"]
    jobs = [(p, c) for p in prompts for c in cases]

    def run(job):
        r = chat(client, job[0], max_tokens=14, **job[1])
        return r.choices[0].message.content, (r.choices[0].model_extra or {}).get("guard")

    sequential = [run(j) for j in jobs]
    barrier = threading.Barrier(len(jobs))

    def together(job):
        barrier.wait()
        return run(job)

    with ThreadPoolExecutor(len(jobs)) as pool:
        concurrent = list(pool.map(together, jobs))
    assert concurrent == sequential
    assert sequential[1][1] is None and sequential[0][1]["touched"] > 0


@pytest.mark.parametrize("guard, param, code", [
    ({"vector": "hum", "mode": "cap"}, "guard.hi", "guard_not_calibrated"),
    ({"vector": "opt", "mode": "cap", "layer": 1}, "guard.layer", "guard_not_calibrated"),
    ({"vector": "opt", "mode": "clamp"}, "guard.mode", "invalid_value"),
    ({"vector": "opt", "mode": "cap", "lo": 5.0, "hi": 1.0}, "guard.lo", "invalid_value"),
    ({"vector": "opt", "mode": "cap", "coef": 1.0}, "guard", "invalid_value"),
    ({"vector": "nope"}, "guard.vector", "unknown_vector"),
    ({"vector": "opt", "hi": "x"}, "guard.hi", "invalid_value"),
])
def test_guard_errors(server, guard, param, code):
    r = httpx.post(server + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "guard": guard})
    assert r.status_code == 400 and r.json()["error"]["param"] == param and r.json()["error"]["code"] == code


def test_vectors_endpoint_shows_the_guard_range(server, vectors):
    info = httpx.get(server + "/v1/vectors", headers={"Authorization": f"Bearer {KEY}"}).json()
    by = {v["name"]: v for v in info["vectors"]}
    cal = GuardCalibration.from_vector(load_vector(vectors["opt"]))
    assert by["opt"]["guard"]["hi"] == pytest.approx(cal.hi) and by["hum"]["guard"] is None
