"""The shipped real-answer set: schema, size per trait, split by question, and what the loader makes of it."""

from collections import Counter

import pytest

from personascope.judges.labelled import HELDOUT_FROM, _data, _rows, load_real_set
from personascope.traits.trait import builtin_traits


def _trait_rows(trait: str) -> list[dict]:
    return _rows(_data("judge_real", f"{trait}.jsonl"))


@pytest.mark.parametrize("trait", builtin_traits())
def test_each_trait_has_labelled_answers_of_both_models_and_a_heldout_third(trait):
    rows = _trait_rows(trait)
    assert len(rows) >= 40
    assert len({r["id"] for r in rows}) == len(rows)
    assert {r["model"] for r in rows} >= {"qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"}
    assert any(r["condition"].startswith("steer") for r in rows)
    for r in rows:
        assert r["level"] in (0, 1, 2) and isinstance(r["refusal"], bool) and isinstance(r["incoherent"], bool)
        assert r["split"] == ("heldout" if r["question_index"] >= HELDOUT_FROM else "tune"), r["id"]
        assert r["answer"].strip() and r["question"].strip()
    held = sum(r["split"] == "heldout" for r in rows)
    assert 0.25 <= held / len(rows) <= 0.4


def test_the_heldout_part_has_shown_answers_for_every_trait():
    # incoherent answers keep the level their text shows (impolite's held-out shown answers are all profane salad)
    rows = [r for r in load_real_set() if r.group == "real:heldout" and not r.refusal]
    shown = Counter(r.trait for r in rows if r.level == 2)
    assert set(shown) == set(builtin_traits())


def test_loader_groups_by_question_index():
    rows = load_real_set(["optimistic"])
    assert {r.group for r in rows} == {"real:tune", "real:heldout"}
    assert len(rows) == len(_trait_rows("optimistic"))
