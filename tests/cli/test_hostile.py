"""Hostile-user probes: one bad request, file or option must never cost anyone else's work.

Server probes run a real uvicorn server (in a thread) around an engine with the tiny test model.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from servers import MODEL, ThreadServer, tiny_vectors

from personascope.serve import Engine, ServeConfig, create_app, load_serving_model
from personascope.vectors.file import load_vector

KEY = "hostile-key"


def body(text: str = "Tell me about the sea.", **kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 12, "temperature": 0,
            **kw}


def post(url: str, payload: dict, **kw) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json=payload, timeout=60, **kw)


def content(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def vecs(tmp_path_factory):
    paths = tiny_vectors(tmp_path_factory.mktemp("hostile-vectors"))
    return {name: load_vector(p) for name, p in paths.items()}


@pytest.fixture(scope="module")
def keyless(vecs):
    """A keyless loopback server (the browser guard is on) with long max_tokens allowed."""
    engine = Engine(load_serving_model(MODEL), vecs, ServeConfig(max_tokens_limit=3000, batch_wait_ms=20),
                    model_id=MODEL)
    with ThreadServer(create_app(engine)) as srv:
        yield srv.url, engine


def test_tiny_temperature_is_greedy(keyless):
    url, engine = keyless
    greedy = content(post(url, body()))
    for t in (1e-300, 1e-6):
        assert content(post(url, body(temperature=t, seed=1))) == greedy
    assert engine.stats["errors"] == 0


def test_a_non_finite_row_fails_alone(vecs):
    """A request whose logits go NaN (a token whose embedding is inf) fails; its batch-mates complete."""
    adapter = load_serving_model(MODEL)
    poison = adapter.tokenizer.convert_tokens_to_ids("~")
    with torch.no_grad():
        adapter.model.get_input_embeddings().weight[poison] = float("inf")
    prompts = ["Tell me about the sea.", "How do I bake bread?", "Name a colour."]
    with ThreadServer(create_app(Engine(adapter, {}, ServeConfig(), model_id=MODEL))) as srv:
        alone = [content(post(srv.url, body(p))) for p in prompts]
    # a batch of exactly five leaves as soon as the fifth arrives; the long window only guards a starved CPU
    engine = Engine(adapter, {}, ServeConfig(batch_wait_ms=30_000, max_batch=5), model_id=MODEL)
    with ThreadServer(create_app(engine)) as srv:
        barrier = threading.Barrier(len(prompts) + 2)

        def send(payload):
            barrier.wait()
            return post(srv.url, payload)

        payloads = [body(p) for p in prompts] + [body("~~~"), body("~ sampled", temperature=1.0, seed=3)]
        before = engine.stats["batches"]
        with ThreadPoolExecutor(len(payloads)) as pool:
            results = list(pool.map(send, payloads))
        assert engine.stats["batches"] - before == 1  # all five decoded in one batch
        assert [content(r) for r in results[:3]] == alone
        for r in results[3:]:
            assert r.status_code == 500
            err = r.json()["error"]
            assert err["code"] == "non_finite_logits" and "non-finite" in err["message"]
        with ThreadPoolExecutor(5) as pool:  # still serving: the next full batch is answered as before
            again = list(pool.map(lambda _: post(srv.url, body(prompts[0])), range(5)))
        assert [content(r) for r in again] == [alone[0]] * 5


@pytest.mark.parametrize("steer, param", [
    ({"vector": "opt", "layer": 2, "alpha": 10.5}, "steering[0].alpha"),
    ({"vector": "opt", "layer": 2, "coef": 50.0}, "steering[0].coef"),  # ‖v‖ = resid_norm = 4: α = 50
    ({"vector": "opt", "layer": 2, "alpha": 9999}, "steering[0].alpha"),
])
def test_coefficients_are_bounded_after_alpha_conversion(keyless, steer, param):
    url, _ = keyless
    r = post(url, body(steering=[steer]))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == "invalid_coefficient" and "α" in err["message"]


def test_the_largest_allowed_alpha_still_works(keyless):
    url, _ = keyless
    assert isinstance(content(post(url, body(steering=[{"vector": "opt", "layer": 2, "alpha": 10}]))), str)


def test_browser_origin_protection(keyless):
    url, _ = keyless
    ok = body(max_tokens=2)

    r = httpx.post(url + "/v1/chat/completions", content=json.dumps(ok), headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    r = httpx.post(url + "/v1/chat/completions", content=json.dumps(ok))  # no content type at all
    assert r.status_code == 415
    for host in ("evil.example", "evil.example:80", "127.0.0.1.evil.example"):
        r = httpx.post(url + "/v1/chat/completions", json=ok, headers={"Host": host})
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_host", host
        assert httpx.get(url + "/v1/vectors", headers={"Host": host}).status_code == 403
    port = url.rsplit(":", 1)[1]
    for host in (f"localhost:{port}", "localhost", f"[::1]:{port}"):
        assert httpx.post(url + "/v1/chat/completions", json=ok, headers={"Host": host}).status_code == 200
    r = httpx.post(url + "/v1/chat/completions", json=ok, headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200


def test_retry_after_on_429_and_health_hides_the_model():
    engine = Engine(load_serving_model(MODEL), {}, ServeConfig(max_queue=0, api_key=KEY), model_id="/home/me/model")
    with ThreadServer(create_app(engine)) as srv:
        auth = {"Authorization": f"Bearer {KEY}"}
        r = httpx.post(srv.url + "/v1/chat/completions", json={**body(), "model": "/home/me/model"}, headers=auth)
        assert r.status_code == 429 and r.headers["Retry-After"] == "1"
        anon = httpx.get(srv.url + "/health").json()
        assert anon["status"] == "ok" and "model" not in anon and "/home/me" not in str(anon)
        assert httpx.get(srv.url + "/health", headers=auth).json()["model"] == "/home/me/model"
        # a keyed server may be addressed by any name (the key protects it)
        assert httpx.get(srv.url + "/health", headers={"Host": "myhost.lan"}).status_code == 200


def test_deeply_nested_json_is_a_400_and_the_connection_survives(keyless):
    url, _ = keyless
    with httpx.Client(base_url=url, timeout=60) as client:
        for depth in (1000, 100_000 // 2, 40):
            raw = "[" * depth + "]" * depth
            r = client.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
            assert r.status_code in (400, 413), (depth, r.text)
            if r.status_code == 400:
                assert r.json()["error"]["code"] == "invalid_json"
        deep: object = 1
        for _ in range(40):
            deep = [deep]
        nested = body(seed={"a": deep})
        r = client.post("/v1/chat/completions", json=nested)
        assert r.status_code == 400 and "nests deeper" in r.json()["error"]["message"]
        assert client.post("/v1/chat/completions", json=body(max_tokens=2)).status_code == 200


def test_an_abandoned_request_stops_generating(keyless):
    url, engine = keyless
    # steered this hard the tiny model repeats one token and never says EOS, so only the limit would end it
    payload = body("Write a very long story.", max_tokens=3000, steering=[{"vector": "opt", "layer": 2, "alpha": 10}])
    r = post(url, {**payload, "max_tokens": 200})
    assert r.json()["choices"][0]["finish_reason"] == "length"
    start = engine.stats["tokens"]
    with pytest.raises(httpx.TimeoutException):
        httpx.post(url + "/v1/chat/completions", json=payload, timeout=1.0)
    deadline = time.monotonic() + 10
    while engine.pending and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.pending == 0
    made = engine.stats["tokens"] - start
    assert 0 < made < 2500, made



# ---------------------------------------------------------------- the command line: one error path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model on disk, vectors good and bad, and broken trait and data files."""
    from tiny import tiny_pair

    from personascope.model.adapter import ModelAdapter
    from personascope.vectors.file import PersonaVector

    d = tmp_path_factory.mktemp("hostile-files")
    model, tok = tiny_pair("qwen2")
    model.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    a = ModelAdapter(model, tok)
    v = torch.randn(a.n_layers + 1, a.hidden_size, generator=torch.Generator().manual_seed(0))
    PersonaVector({"response_avg": v}, torch.ones(a.n_layers + 1), {"trait": "evil"}).save(d / "v.safetensors")
    torch.save(v, d / "evil_response_avg_diff.pt")
    PersonaVector({"response_avg": v * float("nan")}, None, {"trait": "evil"}).save(d / "nan.safetensors")
    (d / "garbage.safetensors").write_bytes(b"\x00garbage" * 20)
    (d / "garbage.pt").write_bytes(b"not a torch file")
    from personascope.traits.trait import load_trait

    t = load_trait("evil")
    data = {"instruction": [dict(p) for p in t.instructions], "questions": t.extract_questions + t.eval_questions,
            "eval_prompt": t.eval_prompt}
    data["instruction"][0]["negative"] = data["instruction"][0].pop("neg")
    (d / "negative.json").write_text(json.dumps(data))
    (d / "latin.json").write_bytes(json.dumps({"instruction": "caf\u00e9"}, ensure_ascii=False).encode("latin-1"))
    row = {"messages": [{"role": "user", "content": "caf\u00e9?"}, {"role": "assistant", "content": "ok"}]}
    (d / "latin.jsonl").write_bytes((json.dumps(row, ensure_ascii=False) + "\n").encode("latin-1"))
    return d


def _bad_invocations(d):
    m = ["--model", str(d / "model")]
    ev = ["evaluate", "evil", *m, "--vector", str(d / "v.safetensors")]
    return [
        (["extract", "evil", "--model", str(d / "nope")], f"--model '{d / 'nope'}': cannot load the model"),
        (["extract", "evil", *m, "--judge-model", str(d / "nope")], f"--judge-model '{d / 'nope'}': cannot load"),
        (["evaluate", "evil", *m, "--judge-model", str(d / "nope")], f"--judge-model '{d / 'nope'}': cannot load"),
        ([*ev, "--layer", "abc"], "--layer 'abc' is not a whole number"),
        ([*ev, "--layer", "1.7"], "--layer '1.7' is not a whole number"),
        ([*ev, "--layer", "9"], "layer 9 is out of range"),
        ([*ev, "--coef", "abc"], "--coef 'abc' is not a number"),
        ([*ev, "--coef", "inf"], "--coef 'inf' must be a finite number"),
        ([*ev, "--alpha", "nan"], "--alpha 'nan' must be a finite number"),
        ([*ev, "--positions", "bogus"], "--positions 'bogus' is not one of all, prompt, response"),
        ([*ev, "--profile", "bogus"], "--profile 'bogus' is not one of quick, paper"),
        ([*ev, "--judge-mode", "bogus"], "--judge-mode 'bogus' is not a scoring mode"),
        (["extract", "evil", *m, "--profile", "bogus"], "unknown profile 'bogus'"),
        (["extract", "evil", *m, "--judge-mode", "bogus"], "--judge-mode 'bogus'"),
        (["evaluate", "evil", *m, "--layer", "2"], "add --vector FILE"),
        (["evaluate", "evil", *m, "--vector", str(d / "evil_response_avg_diff.pt"), "--alpha", "0.5"],
         "has no resid_norm"),
        (["choose-layer", "evil", *m, "--vector", str(d / "evil_response_avg_diff.pt")], "has no resid_norm"),
        (["choose-layer", str(d / "negative.json"), *m, "--vector", str(d / "v.safetensors")],
         "missing 'neg' (it has 'negative'"),
        (["choose-layer", "evil", *m, "--vector", str(d / "v.safetensors"), "--layers", "a,b"],
         "--layers 'a' is not a whole number"),
        (["choose-layer", "evil", *m, "--vector", str(d / "v.safetensors"), "--alpha", "nan"],
         "'--alpha': nan must be a finite number"),
        (["extract", str(d / "latin.json")], "latin.json: not UTF-8"),
        (["traits", "show", str(d / "negative.json")], "field 'instruction[0]': missing 'neg'"),
        (["vector", "info", str(d / "garbage.safetensors")], "not a readable .safetensors vector file"),
        (["vector", "info", str(d / "nan.safetensors")], "non-finite"),
        ([*ev[:4], "--vector", str(d / "garbage.pt")], "garbage.pt: not a readable .pt tensor file"),
        (["serve", *m, "--vector", str(d / "nan.safetensors")], "nan.safetensors: 'response_avg' holds non-finite"),
        (["serve", *m, "--port", "abc"], "Invalid value for '--port'"),
        (["screen", str(d / "latin.jsonl"), *m, "--vector", str(d / "v.safetensors"), "--layer", "x"],
         "Invalid value for '--layer'"),
        (["finetune", str(d / "latin.jsonl"), *m, "--out", str(d / "ft")], "latin.jsonl:1: not UTF-8"),
        (["finetune", str(d / "latin.jsonl"), *m, "--out", str(d / "ft"), "--steer-coef", "inf"],
         "'--steer-coef': inf must be a finite number"),
        (["make-dataset", "evil", "--level", "III"], "unknown --level 'III'"),
        (["extract"], "Missing argument 'trait'"),
    ]


def test_every_bad_invocation_is_one_line_naming_the_problem(files):
    from typer.testing import CliRunner

    from personascope.cli.main import app

    runner = CliRunner()
    for args, expected in _bad_invocations(files):
        res = runner.invoke(app, args, env={"COLUMNS": "80"})
        last = res.stdout.strip().splitlines()[-1]  # (model loading may draw a progress bar on stderr)
        assert res.exit_code == 2, (args, res.output, res.exception)
        assert last.startswith("error: ") and res.output.count("error:") == 1, (args, res.output)
        assert "Traceback" not in res.output and expected in last, (args, last)
        assert not (files / "ft").exists() or args[0] != "finetune"
