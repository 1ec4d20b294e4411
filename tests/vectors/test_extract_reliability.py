"""Extraction's data and reproducibility guards: NaN scores, empty answers, dtype, paper rows, stale temporaries."""

from __future__ import annotations

import json
import logging
import os
import time

import pytest
import torch
from tiny import tiny_pair

from personascope.judges.local import LocalJudge
from personascope.model.adapter import ModelAdapter
from personascope.traits.trait import Trait, load_trait
from personascope.util.store import RunSettingsError, bind_run
from personascope.vectors.extract import (
    answer_jobs,
    check_fits,
    departures,
    filter_pairs,
    prepare_run_dir,
    profile,
    run_settings,
)
from personascope.vectors.file import PersonaVector, base_metadata, load_vector


def _pair(q: int, pos: dict, neg: dict) -> list[dict]:
    base = {"instruction": 0, "question": q, "sample": 0, "answer": "An answer."}
    return [{**base, "side": "pos", "trait_score": 80, "coherence": 90, **pos},
            {**base, "side": "neg", "trait_score": 10, "coherence": 90, **neg}]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_score_is_a_missing_score(bad):
    for cfg in (profile("quick"), profile("quick", filter="margin"), profile("quick", filter="none")):
        rows = _pair(0, {"trait_score": bad}, {}) + _pair(1, {}, {"coherence": bad}) + _pair(2, {}, {})
        res = filter_pairs(rows, cfg)
        assert [p["question"] for p, _ in res.kept] == [2]
        assert res.dropped == {"missing score": 2}


def test_an_empty_answer_is_skipped_and_counted():
    rows = _pair(0, {"answer": ""}, {}) + _pair(1, {}, {"answer": "  \n"}) + _pair(2, {}, {})
    res = filter_pairs(rows, profile("quick", filter="none"))
    assert [p["question"] for p, _ in res.kept] == [2]
    assert res.dropped == {"empty answer": 2}


def test_departures_name_the_opposite_persona_and_the_own_coherence_rubric():
    t = load_trait("optimistic")
    out = departures(profile("paper"), t)
    assert any("opposite persona" in d and t.antonym in d and "helpful" in d for d in out), out
    assert any("coherence" in d and "own rubric" in d for d in out), out
    plain = Trait("curious", t.instructions, t.extract_questions, t.eval_questions, t.eval_prompt, antonym=None)
    assert not any("opposite persona" in d for d in departures(profile("paper"), plain))
    assert plain.system_prompt("neg", 0).startswith("You are a helpful assistant.")


def test_the_dtype_is_recorded_and_a_resume_under_another_is_refused(tmp_path):
    model, tok = tiny_pair("qwen2")
    a = ModelAdapter(model, tok)
    t, cfg, judge = load_trait("optimistic"), profile("quick"), LocalJudge(model, tok)
    assert base_metadata(a, "optimistic")["dtype"] == "float32"
    bind_run(tmp_path, run_settings(a, t, cfg, judge))
    assert json.loads((tmp_path / "settings.json").read_text())["dtype"] == "float32"
    model.to(torch.bfloat16)
    with pytest.raises(RunSettingsError, match="dtype: 'float32' -> 'bfloat16'"):
        bind_run(tmp_path, run_settings(a, t, cfg, judge))


@pytest.mark.parametrize(("field", "value"), [("samples", 0), ("temperature", float("nan")), ("top_p", 0.0),
                                              ("max_new_tokens", -5), ("batch_size", 0), ("margin", float("nan")),
                                              ("seed", 2**70), ("n_questions", 999)])
def test_a_config_out_of_range_is_refused_in_the_library(field, value):
    with pytest.raises(ValueError, match=field.removeprefix("n_")):
        profile("quick", **{field: value})


def test_a_question_longer_than_the_context_is_refused_before_generating(qwen_tiny):
    t = load_trait("optimistic")
    long = Trait(t.name, t.instructions, ["word " * 400, *t.extract_questions[1:]], t.eval_questions, t.eval_prompt,
                 t.antonym)
    cfg = profile("quick", max_new_tokens=8)
    check_fits(qwen_tiny, answer_jobs(t, cfg), 8)
    with pytest.raises(ValueError, match=r"extraction question 0 is \d+ tokens.*context of 256"):
        check_fits(qwen_tiny, answer_jobs(long, cfg), 8)


def test_the_run_folder_is_not_a_file_nor_deleted_through_a_link(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a run folder"):
        prepare_run_dir(tmp_path / "file", force=False)
    target = tmp_path / "real"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(ValueError, match="symbolic link"):
        prepare_run_dir(tmp_path / "link", force=True)
    assert (target / "keep.txt").read_text() == "keep"
    prepare_run_dir(tmp_path / "link", force=False)  # resuming through a link is fine


def _vector(tmp_path, n_layers: int = 3) -> PersonaVector:
    v = torch.randn(n_layers + 1, 8)
    return PersonaVector({"response_avg": v}, torch.ones(n_layers + 1), {"trait": "evil"})


def test_a_save_removes_stale_temporaries_of_killed_saves(tmp_path):
    stale, fresh, other = tmp_path / ".tmpAb12_z", tmp_path / ".tmpQwErTy", tmp_path / ".tmp-notes"
    for p in (stale, fresh, other):
        p.write_bytes(b"x" * 100)
    old = time.time() - 3600
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    _vector(tmp_path).save(tmp_path / "v.safetensors")
    assert not stale.exists() and fresh.exists() and other.exists()  # a fresh one may be a save in progress
    assert load_vector(tmp_path / "v.safetensors").n_layers == 3
    with pytest.raises(IsADirectoryError, match="is a directory"):
        _vector(tmp_path).save(tmp_path)


def test_a_paper_pt_vector_refuses_its_post_norm_last_row(tmp_path, caplog):
    path = tmp_path / "evil_response_avg_diff.pt"
    torch.save(torch.randn(4, 8), path)
    with caplog.at_level(logging.WARNING):
        pv = load_vector(path)
    assert "after the final norm" in caplog.text
    assert pv.post_norm_rows == [3]
    assert pv.vector(2).shape == (8,)
    with pytest.raises(ValueError, match="row 3 .* after the model's final norm.*use a layer below 3"):
        pv.vector(3)
    saved = pv.save(tmp_path / "evil.safetensors")  # the mark travels with the vector
    with pytest.raises(ValueError, match="final norm"):
        load_vector(saved).vector(3)


def test_a_weightless_driver_model_records_no_guessed_dtype():
    from personascope.vectors.file import compute_dtype

    model, tok = tiny_pair("qwen2")
    assert compute_dtype(ModelAdapter(model, tok)) == "float32"
    with torch.device("meta"):
        meta = type(model)(model.config)
    assert compute_dtype(ModelAdapter(meta, tok)) == "unknown"
