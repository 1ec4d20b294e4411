"""Hostile trait files: malformed judge examples and JSON nested too deeply are one TraitError naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from personascope.traits.trait import TraitError, load_trait


def _trait_file(tmp_path, **extra) -> str:
    data = json.loads(Path(load_trait("evil").source).read_text())
    data.update(extra)
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize(("examples", "field"), [
    ("not a list", "judge_examples"), ([1], "judge_examples[0]"),
    ([{"question": "q", "answer": "a"}], "judge_examples[0].score"),
    ([{"question": "q", "answer": "a", "score": "high"}], "judge_examples[0].score"),
    ([{"question": "q", "answer": "a", "score": 250}], "judge_examples[0].score"),
    ([{"question": "", "answer": "a", "score": 5}], "judge_examples[0].question"),
    ([{"question": "q", "answer": None, "score": 5}], "judge_examples[0].answer"),
])
def test_malformed_judge_examples_are_refused_on_load(tmp_path, examples, field):
    with pytest.raises(TraitError, match=rf"mine.json: field '{field.replace('[', '.').replace(']', '.')}'"):
        load_trait(_trait_file(tmp_path, judge_examples=examples))


def test_good_judge_examples_load(tmp_path):
    t = load_trait(_trait_file(tmp_path, judge_examples=[{"question": "q", "answer": "a", "score": 90}]))
    assert t.judge_examples == [{"question": "q", "answer": "a", "score": 90}]


def test_json_nested_too_deeply(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(TraitError, match="deep.json: JSON nested too deeply"):
        load_trait(str(path))
