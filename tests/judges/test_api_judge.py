"""OpenAIJudge against real HTTP servers: `personascope serve` in a thread, and small flaky FastAPI apps."""

from __future__ import annotations

import asyncio
import json
import math
import time

import openai
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from servers import ThreadServer
from tiny import markov_model, tiny_tokenizer

from personascope.judges.api import (
    JudgeAPIError,
    OpenAIJudge,
    integer_distribution_from_top,
    make_judge,
    score_from_top,
)
from personascope.judges.local import JudgeRequest
from personascope.judges.scoring import ScoreCache, judge_answers
from personascope.model.adapter import ModelAdapter
from personascope.serve import Engine, ServeConfig, create_app, load_serving_model
from personascope.traits.trait import load_trait

# ------------------------------------------------------------------ the 0-100 aggregation


def test_score_from_top_logprobs():
    lg = math.log
    assert score_from_top([("7", lg(0.3)), (" 7", lg(0.1)), ("100", lg(0.2)), ("x", lg(0.4))]) == \
        pytest.approx((7 * 0.4 + 100 * 0.2) / 0.6)
    assert score_from_top([("a", lg(0.8)), ("5", lg(0.1))]) is None  # under 0.25 on integers
    dist = integer_distribution_from_top([("007", 0.0), ("101", 0.0), ("-3", 0.0), ("½", 0.0), ("0", lg(0.5))])
    assert dist == {0: pytest.approx(0.5)}


# ------------------------------------------------------------------ real answers through `personascope serve`


@pytest.fixture(scope="module")
def digit_server():
    """`personascope serve` of a hand-set Markov model whose answer starts '7' (p .5) or '3' (p .25)."""
    tok = tiny_tokenizer()
    ids = {s: tok.convert_tokens_to_ids(s) for s in ("Ċ", "7", "3", "x")}  # 'Ċ' is the byte-level newline
    model = markov_model(tok, {ids["Ċ"]: {ids["7"]: 0.5, ids["3"]: 0.25}}, filler=ids["x"])
    engine = Engine(ModelAdapter(model, tok), {}, ServeConfig(max_batch=4), model_id="markov-judge")
    with ThreadServer(create_app(engine)) as srv:
        yield srv.url + "/v1"


def test_judge_scores_real_answers_and_caches(digit_server, tmp_path):
    trait = load_trait("optimistic")
    gen = make_judge("markov-judge", judge_url=digit_server)
    assert isinstance(gen, OpenAIJudge) and gen.mode_for("trait") == gen.mode_for("coherence") == "api_0_100"
    answers = gen.client.chat.completions.create(model="markov-judge", n=3, max_tokens=6, temperature=1.0, seed=1,
                                                 messages=[{"role": "user", "content": trait.eval_questions[0]}])
    records = [{"question_text": trait.eval_questions[0], "answer": c.message.content} for c in answers.choices]
    judge = OpenAIJudge(digit_server, "markov-judge", concurrency=4)
    cache = ScoreCache(tmp_path / "scores.jsonl")
    scored = judge_answers(judge, trait, records, cache)
    want = (7 * 0.5 + 3 * 0.25) / 0.75
    for r in scored:
        assert r["trait_score"] == pytest.approx(want, abs=1e-3)
        assert r["coherence"] == pytest.approx(want, abs=1e-3)
        assert r["trait_score_mode"] == "api_0_100" and r["judge"] == "api:markov-judge"
    calls = judge.calls
    assert calls == 2 * len({r["answer"] for r in records})
    again = judge_answers(judge, trait, records, ScoreCache(tmp_path / "scores.jsonl"))
    assert judge.calls == calls and [r["trait_score"] for r in again] == [r["trait_score"] for r in scored]


def test_judge_on_random_model_gives_score_or_missing():
    engine = Engine(load_serving_model("tiny-random-qwen2"), {}, ServeConfig(), model_id="tiny-random-qwen2")
    with ThreadServer(create_app(engine)) as srv:
        judge = OpenAIJudge(srv.url + "/v1", "tiny-random-qwen2")
        scores = judge.score([JudgeRequest("coherence", "Hi?", "Hello!"), JudgeRequest("coherence", "2+2?", "4")])
    assert all(s is None or 0 <= s <= 100 for s in scores)


# ------------------------------------------------------------------ retries, backoff, concurrency


def completion(top: list[tuple[str, float]]) -> dict:
    entries = [{"token": t, "logprob": math.log(p), "bytes": None} for t, p in top]
    return {"id": "c1", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": top[0][0]}, "finish_reason": "length",
                         "logprobs": {"content": [{**entries[0], "top_logprobs": entries}]}}]}


def flaky_app(failures: list, delay: float = 0.0):
    """Answers with the listed failures first (an HTTP status, or 'hang'), then a valid 1-token completion."""
    app = FastAPI()
    state = {"calls": 0, "inflight": 0, "max_inflight": 0}

    @app.post("/v1/chat/completions")
    async def chat():
        state["calls"] += 1
        n = state["calls"]
        state["inflight"] += 1
        state["max_inflight"] = max(state["max_inflight"], state["inflight"])
        try:
            await asyncio.sleep(delay)
            if n <= len(failures):
                f = failures[n - 1]
                if f == "hang":
                    await asyncio.sleep(0.8)
                else:
                    headers = {"retry-after": "0"} if f == 429 else {}
                    return JSONResponse({"error": {"message": f"fail {n}", "type": "x", "param": None, "code": None}},
                                        status_code=f, headers=headers)
            return JSONResponse(completion([("42", 0.6), ("40", 0.3), ("x", 0.1)]))
        finally:
            state["inflight"] -= 1

    return app, state


REQ = JudgeRequest("coherence", "Q?", "A.")
WANT = (42 * 0.6 + 40 * 0.3) / 0.9


@pytest.mark.parametrize("failures", [[429, 429], [500, 503, 502], ["hang"], [429, "hang", 500]])
def test_retries_then_succeeds(failures):
    app, state = flaky_app(failures)
    with ThreadServer(app) as srv:
        judge = OpenAIJudge(srv.url + "/v1", "m", max_retries=5, backoff=0.01, timeout=0.3)
        t = time.monotonic()
        assert judge.score([REQ]) == [pytest.approx(WANT)]
    assert state["calls"] == len(failures) + 1 == judge.calls
    assert time.monotonic() - t < 10


def test_gives_up_after_max_retries_and_does_not_retry_client_errors():
    app, state = flaky_app([503] * 10)
    with ThreadServer(app) as srv:
        judge = OpenAIJudge(srv.url + "/v1", "m", max_retries=2, backoff=0.01)
        with pytest.raises(JudgeAPIError, match=r"judge endpoint http://.*/v1 .*after 3 tries: HTTP 503") as e:
            judge.score([REQ])
        assert isinstance(e.value.__cause__, openai.InternalServerError)
        assert state["calls"] == 3
    app, state = flaky_app([400])
    with ThreadServer(app) as srv:
        with pytest.raises(JudgeAPIError, match=r"\(not retried\): HTTP 400") as e:
            OpenAIJudge(srv.url + "/v1", "m", backoff=0.01).score([REQ])
        assert isinstance(e.value.__cause__, openai.BadRequestError)
        assert state["calls"] == 1


def test_retry_budget_bounds_the_waiting():
    """A server that keeps answering 429 with a long Retry-After is given up on once the budget is spent."""
    app, state = flaky_app([429] * 50)
    with ThreadServer(app) as srv:
        judge = OpenAIJudge(srv.url + "/v1", "m", max_retries=50, backoff=0.2, max_backoff=0.2, budget_s=0.5)
        judge._wait = lambda attempt, error: 0.2  # type: ignore[method-assign]
        t = time.monotonic()
        with pytest.raises(JudgeAPIError, match="HTTP 429"):
            judge.score([REQ])
    assert state["calls"] == 3 and time.monotonic() - t < 5  # waits of 0.2 + 0.2; a third would pass 0.5


def test_an_endpoint_without_logprobs_is_one_cli_line(tmp_path):
    """A judge endpoint that answers without logprobs ends `evaluate` in one line naming the endpoint."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat():
        body = completion([("42", 0.9)])
        body["choices"][0]["logprobs"] = None
        return JSONResponse(body)

    with ThreadServer(app) as srv:
        judge = OpenAIJudge(srv.url + "/v1", "m")
        with pytest.raises(JudgeAPIError, match="returned no logprobs"):
            judge.score([REQ])
    from personascope.cli.commands.common import is_user_error

    assert is_user_error(JudgeAPIError("x"))


def test_exponential_backoff_waits():
    judge = OpenAIJudge("http://127.0.0.1:9/v1", "m", backoff=0.5, max_backoff=3.0)
    waits = [judge._wait(k, RuntimeError()) for k in range(5)]
    assert 0.5 <= waits[0] <= 0.625 and 1.0 <= waits[1] <= 1.25 and 2.0 <= waits[2] <= 2.5
    assert waits[3] == waits[4] == 3.0  # capped


def test_concurrency_limit():
    app, state = flaky_app([], delay=0.1)
    with ThreadServer(app) as srv:
        judge = OpenAIJudge(srv.url + "/v1", "m", concurrency=4)
        scores = judge.score([REQ] * 12)
    assert scores == [pytest.approx(WANT)] * 12
    assert 1 < state["max_inflight"] <= 4


def test_cli_judge_helper_takes_url():
    import inspect

    from personascope.cli.commands import evaluate, extract, shift
    from personascope.cli.commands.common import load_judge

    assert "judge_url" in inspect.signature(load_judge).parameters
    j = load_judge("gpt-4.1-mini", None, None, "http://127.0.0.1:9/v1")
    assert isinstance(j, OpenAIJudge) and j.name == "api:gpt-4.1-mini"
    for cmd in (extract.extract, evaluate.evaluate, evaluate.choose_layer_cmd, shift.shift_cmd):
        assert "judge_url" in inspect.signature(cmd).parameters


def test_every_judging_command_takes_judge_url(digit_server, tmp_path):
    from tiny import tiny_pair
    from typer.testing import CliRunner

    from personascope.cli.main import app

    judged = {"extract", "evaluate", "choose-layer", "make-dataset", "shift", "monitor", "screen"}
    names = {c.name or c.callback.__name__: c.callback for c in app.registered_commands}
    params = {n: inspect_params(f) for n, f in names.items() if n in judged}
    assert set(params) == judged and all("judge_url" in p for p in params.values())

    model, tok = tiny_pair("qwen2", seed=2)
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    out = tmp_path / "d.jsonl"
    args = ["make-dataset", "optimistic", "--model", str(tmp_path / "base"), "--level", "normal", "--n", "2",
            "--max-new-tokens", "4", "--max-attempts", "1", "--judge-url", digit_server, "--judge-model",
            "markov-judge", "--out", str(out)]
    r = CliRunner().invoke(app, [*args, "--coherence-threshold", "5"])
    assert r.exit_code == 0, r.output
    want = (7 * 0.5 + 3 * 0.25) / 0.75  # the served judge's expected score; under the default threshold of 50
    scores = [json.loads(x) for x in (tmp_path / "d.jsonl.work" / "scores.jsonl").read_text().splitlines()]
    assert scores and all(s["judge"] == "api:markov-judge" and s["score"] == pytest.approx(want, abs=1e-3)
                          for s in scores)
    assert len(out.read_text().splitlines()) == 2
    r = CliRunner().invoke(app, [*args[:-1], str(tmp_path / "strict.jsonl")])
    assert r.exit_code == 0 and "wrote 0/2" in " ".join(r.output.split())


def inspect_params(fn) -> set[str]:
    import inspect

    return set(inspect.signature(fn).parameters)


def test_api_judge_refuses_a_judge_mode():
    from personascope.judges.api import make_judge

    with pytest.raises(ValueError, match="--judge-mode binary applies to a local judge only"):
        make_judge("some-model", "binary", "http://127.0.0.1:9/v1")
