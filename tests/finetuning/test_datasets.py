import json

import pytest
from tiny import tiny_pair

import personascope.model.generate as gen
from personascope.finetuning.datasets import (
    DatasetConfig,
    load_mistakes,
    load_pool,
    make_dataset,
    work_dir_for,
)
from personascope.judges.local import LocalJudge
from personascope.model.adapter import ModelAdapter
from personascope.model.chat import load_chat_jsonl
from personascope.model.generate import SamplingConfig
from personascope.traits.trait import load_trait
from personascope.util.store import read_jsonl


def _cfg(**kw):
    base = dict(n=6, sampling=SamplingConfig(samples=1, temperature=1.0, max_new_tokens=8, batch_size=4),
                trait_threshold=0.0, coherence_threshold=0.0, max_attempts=2)
    return DatasetConfig(**{**base, **kw})


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def setup():
    model, tok = tiny_pair("qwen2", seed=4)
    a = ModelAdapter(model, tok)
    return a, LocalJudge(model, tok, trait_mode="contrastive", coherence_mode="logprob")


def test_make_dataset_writes_chat_rows_without_system_prompts_and_resumes(tmp_path, setup, monkeypatch):
    a, judge = setup
    trait = load_trait("optimistic")
    out = tmp_path / "opt-II.jsonl"
    res = make_dataset(a, trait, "II", out, judge, _cfg())
    rows = _rows(out)
    assert res.rows == len(rows) == 6 and res.skipped == 0
    pool = set(load_pool())
    for r in rows:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"] and set(r) == {"messages"}
        assert r["messages"][0]["content"] in pool
    assert len(load_chat_jsonl(out)) == 6
    answers = list(read_jsonl(work_dir_for(out) / "answers.jsonl"))
    assert len(answers) == 6 and all(r["side"] == "pos" for r in answers)
    assert {r["system"] for r in answers} == {trait.system_prompt("pos", i) for i in range(5)}
    assert [r["messages"][1]["content"] for r in rows] == [
        next(x["answer"] for x in answers if x["question_text"] == r["messages"][0]["content"]) for r in rows]

    calls = {"gen": 0, "judge": 0}
    real_gen, real_score = gen.generate_batch, judge.score

    def gen_spy(*args, **kw):
        calls["gen"] += 1
        return real_gen(*args, **kw)

    def score_spy(reqs):
        calls["judge"] += len(reqs)
        return real_score(reqs)

    monkeypatch.setattr(gen, "generate_batch", gen_spy)
    monkeypatch.setattr(judge, "score", score_spy)
    before = out.read_text()
    again = make_dataset(a, trait, "II", out, judge, _cfg())
    assert calls == {"gen": 0, "judge": 0} and out.read_text() == before and again.rows == 6
    from personascope.util.store import RunSettingsError

    other = _cfg(sampling=SamplingConfig(samples=1, temperature=0.5, max_new_tokens=8, batch_size=4))
    with pytest.raises(RunSettingsError, match=r"temperature: 1.0 -> 0.5.*--force"):
        make_dataset(a, trait, "II", out, judge, other)
    assert calls == {"gen": 0, "judge": 0}
    make_dataset(a, trait, "II", out, judge, other, force=True)
    assert calls["gen"] > 0


def test_failing_rows_are_resampled_then_skipped(tmp_path, setup):
    a, judge = setup
    trait = load_trait("sycophantic")
    out = tmp_path / "never.jsonl"
    res = make_dataset(a, trait, "II", out, judge, _cfg(trait_threshold=101.0, max_attempts=3))
    assert res.rows == 0 and res.skipped == 6 and res.attempts == 3
    answers = list(read_jsonl(work_dir_for(out) / "answers.jsonl"))
    assert sorted({r["sample"] for r in answers}) == [0, 1, 2] and len(answers) == 18

    out2 = tmp_path / "some.jsonl"
    res2 = make_dataset(a, trait, "II", out2, judge, _cfg(trait_threshold=50.0, coherence_threshold=20.0,
                                                          max_attempts=2, n=8))
    scores = {(r["kind"], r["answer"]): r["score"] for r in read_jsonl(work_dir_for(out2) / "scores.jsonl")}
    for r in _rows(out2):
        ans = r["messages"][1]["content"]
        assert scores[("trait", ans)] >= 50.0 and scores[("coherence", ans)] >= 20.0
    assert res2.rows + res2.skipped == 8


def test_levels_use_the_right_instructions(tmp_path, setup):
    a, _ = setup
    trait = load_trait("optimistic")
    for level, sides in (("normal", {"none"}), ("I", {"pos", "none"})):
        out = tmp_path / f"{level}.jsonl"
        make_dataset(a, trait, level, out, None, _cfg(n=4))
        answers = sorted(read_jsonl(work_dir_for(out) / "answers.jsonl"), key=lambda r: r["slot"])
        assert {r["side"] for r in answers} == sides
        if level == "I":
            assert [r["side"] for r in answers] == ["pos", "none", "pos", "none"]
        # normal rows are the model's unprompted answers: no system prompt at all
        assert all(r["system"] == (trait.system_prompt("pos", r["instruction"]) if r["side"] == "pos" else None)
                   for r in answers)
        assert all(len(r["messages"]) == 2 for r in _rows(out))
    # levels share the question order: the same questions, different answers
    qs = [[r["messages"][0]["content"] for r in _rows(tmp_path / f"{lv}.jsonl")] for lv in ("normal", "I")]
    assert qs[0] == qs[1]


def test_extraction_questions_cycle_and_are_sampled_afresh(tmp_path, setup):
    a, _ = setup
    trait = load_trait("optimistic")
    n = len(trait.extract_questions) + 2
    out = tmp_path / "II.jsonl"
    make_dataset(a, trait, "II", out, None, _cfg(n=n, questions="extraction"))
    qs = [r["messages"][0]["content"] for r in _rows(out)]
    assert qs == [trait.extract_questions[i % len(trait.extract_questions)] for i in range(n)]
    assert not set(qs) & set(load_pool())
    answers = read_jsonl(work_dir_for(out) / "answers.jsonl")
    assert len({r["question"] for r in answers}) == n  # a repeated question is its own cache entry

    # a pool dataset cannot reuse this work folder: the question ids mean other questions there
    with pytest.raises(Exception, match="questions"):
        make_dataset(a, trait, "II", tmp_path / "pool.jsonl", None, _cfg(n=4), work_dir=work_dir_for(out))


def test_require_end_resamples_answers_cut_at_the_token_limit(tmp_path, setup, monkeypatch):
    a, _ = setup
    trait = load_trait("optimistic")
    calls = {"n": 0}

    def fake_batch(adapter, prompts, max_new, *args, **kw):  # every 2nd batch call writes a short answer
        calls["n"] += 1
        short = calls["n"] % 2 == 0
        text = " ok" if short else " word" * (max_new + 4)
        return [text.strip() for _ in prompts]

    monkeypatch.setattr(gen, "generate_batch", fake_batch)
    out = tmp_path / "n.jsonl"
    res = make_dataset(a, trait, "normal", out, None, _cfg(n=4, require_end=True, max_attempts=3))
    assert res.rows == 4 and res.attempts == 2
    assert all(r["messages"][1]["content"] == "ok" for r in _rows(out))
    kept = _rows(work_dir_for(out) / "kept.jsonl")
    assert [k["sample"] for k in kept] == [1, 1, 1, 1] and all(k["ended"] for k in kept)
    # without require_end the first (cut) sample is kept
    out2 = tmp_path / "m.jsonl"
    calls["n"] = 0
    assert make_dataset(a, trait, "normal", out2, None, _cfg(n=4)).attempts == 1
    assert all(r["messages"][1]["content"].startswith("word") for r in _rows(out2))


def test_mistakes_dataset_needs_no_model(tmp_path):
    out = tmp_path / "m.jsonl"
    res = make_dataset(None, load_trait("optimistic"), "mistakes", out, None, _cfg(n=10))
    rows = _rows(out)
    wrong = {m["question"]: m["wrong_answer"] for m in load_mistakes()}
    assert res.rows == 10 and len(rows) == 10
    assert all(wrong[r["messages"][0]["content"]] == r["messages"][1]["content"] for r in rows)
    with pytest.raises(ValueError, match="unknown level"):
        make_dataset(None, load_trait("optimistic"), "III", out, None, _cfg())


def test_the_judge_reads_the_question_without_the_formatting_suffix(tmp_path, setup):
    a, judge = setup
    seen: list[str] = []
    score = judge.score

    def recording(reqs):
        seen.extend(r.question for r in reqs)
        return score(reqs)

    judge.score = recording
    out = tmp_path / "II.jsonl"
    make_dataset(a, load_trait("optimistic"), "II", out, judge, _cfg(n=3, question_suffix=" Answer briefly."))
    rows = [r["messages"][0]["content"] for r in _rows(out)]
    assert rows and all(q.endswith(" Answer briefly.") for q in rows)  # the suffix is part of the row
    assert seen and not any(q.endswith("Answer briefly.") for q in seen)  # but not of what the answer is judged on
    assert {q + " Answer briefly." for q in seen} == set(rows)
