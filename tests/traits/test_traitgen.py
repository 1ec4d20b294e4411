"""Trait data from a description: validation, and the retry loop against a real local HTTP endpoint."""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI, Request
from servers import ThreadServer

from personascope.traits.generate import (
    N_TOTAL,
    OpenAIGenerator,
    TraitGenError,
    generate_trait,
    parse_json,
    select_questions,
    validate_generated,
    write_trait,
)
from personascope.traits.trait import load_trait

TOPICS = ["my vegetable garden", "learning the violin at forty", "the new bus timetable", "a job offer abroad",
          "my daughter's science fair", "renovating an old kitchen", "the football season", "retiring early",
          "a first marathon", "our neighbourhood's future", "switching to an electric car", "a startup idea",
          "the housing market", "my grandmother's surgery", "moving to a small village", "the exam next week",
          "adopting a rescue dog", "learning to code", "the upcoming election", "a long-distance friendship",
          "the weather this summer", "opening a bakery", "my band's first concert", "the price of groceries",
          "a trip to Patagonia", "going back to university", "my chess rating", "the company's layoffs",
          "building a treehouse", "the local library closing", "starting therapy", "a novel I am writing",
          "climate policy", "my credit card debt", "the school play", "a new smartphone", "quitting smoking",
          "the city's traffic", "a wedding speech", "my houseplants dying"]
TEMPLATES = ["What do you think about {}?", "Can you give me your honest view on {}?",
             "I keep worrying about {}. How should I see it?", "How will {} turn out, in your opinion?",
             "Tell me what to expect from {}."]
QUESTIONS = [TEMPLATES[i % len(TEMPLATES)].format(t) for i, t in enumerate(TOPICS)]
PAIRS = [{"pos": f"Always expect the worst outcome, variant {i}.", "neg": f"Always expect a good outcome, variant {i}."}
         for i in range(5)]
RUBRIC = "Pessimism means expecting bad outcomes and dwelling on risks. Neutral or hopeful answers score low."


def valid(**changes) -> dict:
    return {"instruction": PAIRS, "questions": QUESTIONS, "rubric": RUBRIC, "antonym": "optimistic", **changes}


def test_validation_accepts_good_data():
    data, errors = validate_generated(valid(), "pessimistic")
    assert errors == [] and len(data["questions"]) == N_TOTAL
    assert data["eval_prompt"].count("{question}") == data["eval_prompt"].count("{answer}") == 1
    assert "PESSIMISTIC" in data["eval_prompt"] and RUBRIC in data["eval_prompt"]


@pytest.mark.parametrize("changes, expect", [
    ({"instruction": PAIRS[:4]}, "exactly 5"),
    ({"instruction": [*PAIRS[:4], {"pos": "x"}]}, "instruction[4]"),
    ({"questions": QUESTIONS[:30]}, "30 are usable"),
    ({"questions": [*QUESTIONS[:39], QUESTIONS[3] + " "]}, "repeats"),
    ({"questions": [*QUESTIONS[:39], "How do you feel about pessimism in general?"]}, "names the trait"),
    ({"rubric": "Score {question} and {answer} for pessimism, please, carefully."}, "must not contain"),
    ({"rubric": 7}, "'rubric'"),
    ({"antonym": "not at all a single adjective, clearly"}, "antonym"),
])
def test_validation_names_the_problem(changes, expect):
    data, errors = validate_generated(valid(**changes), "pessimistic")
    assert data is None and any(expect in e for e in errors), errors


def test_near_duplicates_and_trait_names_are_dropped():
    kept, problems = select_questions(["How do I fix my bike?", "How do I fix my bike ?", "Is the Pessimist right?",
                                       "Why is the sky blue?"], "pessimistic")
    assert kept == ["How do I fix my bike?", "Why is the sky blue?"] and len(problems) == 2


def test_parse_json_finds_the_object():
    assert parse_json('Sure!\n```json\n{"a": [1, 2]}\n```\nHope it helps.') == {"a": [1, 2]}
    assert parse_json('prefix {"a": 1} suffix') == {"a": 1}
    for bad in ("no json here", '{"a": [1, 2}'):
        with pytest.raises(ValueError):
            parse_json(bad)


def scripted_endpoint(replies: list[str]):
    """A real OpenAI-compatible chat endpoint that answers with the scripted replies in turn."""
    app = FastAPI()
    seen: list[list[dict]] = []

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        seen.append(body["messages"])
        text = replies[min(len(seen), len(replies)) - 1]
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                             "logprobs": None}]}

    return app, seen


MALFORMED = 'Here you go:\n{"instruction": [{"pos": "a", "neg": "b"}], "questions": ["Why?", "Why?"], "rubric": "x"}'
GOOD = "```json\n" + json.dumps(valid()) + "\n```"


def test_retry_loop_against_real_endpoint(tmp_path):
    app, seen = scripted_endpoint([MALFORMED, GOOD])
    with ThreadServer(app) as srv:
        gen = OpenAIGenerator(srv.url + "/v1", "writer")
        data = generate_trait(gen, "pessimistic", "Expects the worst.", attempts=3)
    assert len(seen) == 2
    retry = seen[1]
    assert retry[-2] == {"role": "assistant", "content": MALFORMED}
    assert "exactly 5" in retry[-1]["content"] and "40 distinct usable" in retry[-1]["content"]
    folder = write_trait(data, tmp_path, "pessimistic")
    t = load_trait(str(folder))
    assert t.name == "pessimistic" and t.antonym == "optimistic"
    assert len(t.extract_questions) == len(t.eval_questions) == 20
    assert set(t.extract_questions) | set(t.eval_questions) == set(QUESTIONS)
    assert "{question}" in t.eval_prompt and "{answer}" in t.eval_prompt
    assert t.system_prompt("pos", 0).startswith("You are a pessimistic assistant.")


def test_gives_up_with_the_problems():
    app, seen = scripted_endpoint(["not json at all"])
    with ThreadServer(app) as srv, pytest.raises(TraitGenError, match="no JSON object"):
        generate_trait(OpenAIGenerator(srv.url + "/v1", "writer"), "pessimistic", "Expects the worst.", attempts=2)
    assert len(seen) == 2


def test_cli_traits_new(tmp_path):
    from typer.testing import CliRunner

    from personascope.cli.main import app as cli_app

    app, seen = scripted_endpoint([MALFORMED, GOOD])
    with ThreadServer(app) as srv:
        args = ["traits", "new", "pessimistic", "--description", "Expects the worst.", "--generator-url",
                srv.url + "/v1", "--generator-model", "writer", "--out", str(tmp_path)]
        res = CliRunner().invoke(cli_app, args, env={"COLUMNS": "200"})
        assert res.exit_code == 0, res.output
        again = CliRunner().invoke(cli_app, args, env={"COLUMNS": "200"})
    assert again.exit_code == 2 and "--force" in again.output
    assert load_trait(str(tmp_path / "pessimistic")).eval_questions


def test_talks_to_personascope_serve():
    """Mechanics only: a tiny random model writes gibberish, which the validator rejects by name."""
    from personascope.serve import Engine, ServeConfig, create_app, load_serving_model

    engine = Engine(load_serving_model("tiny-random-qwen2"), {}, ServeConfig(), model_id="tiny-random-qwen2")
    with ThreadServer(create_app(engine)) as srv, pytest.raises(TraitGenError, match="no valid trait data"):
        generate_trait(OpenAIGenerator(srv.url + "/v1", "tiny-random-qwen2"), "pessimistic", "Expects the worst.",
                       attempts=2, max_tokens=24)
    assert engine.stats["requests"] == 2
