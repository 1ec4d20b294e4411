import json

import pytest
from typer.testing import CliRunner

from personascope.cli.main import app
from personascope.traits.trait import TraitError, builtin_traits, load_ladder, load_trait

BUILTINS = ["apathetic", "evil", "hallucinating", "humorous", "impolite", "optimistic", "sycophantic"]


def test_builtins_are_complete_and_disjoint():
    assert builtin_traits() == BUILTINS
    seen = set()
    for name in BUILTINS:
        t = load_trait(name)
        assert len(t.instructions) == 5 and len(t.extract_questions) == 20 and len(t.eval_questions) == 20
        assert not set(t.extract_questions) & set(t.eval_questions)
        assert "{question}" in t.eval_prompt and "{answer}" in t.eval_prompt
        for q in t.extract_questions + t.eval_questions:
            assert name not in q.lower(), (name, q)  # questions invite the trait without naming it
        assert not seen & set(t.extract_questions)
        seen |= set(t.extract_questions)
        assert len(load_ladder(name)) >= 8
        assert t.system_prompt("pos", 0).startswith(f"You are {'an' if name[0] in 'aeiou' else 'a'} {name} assistant.")


def test_paper_format_trait_file_loads_unchanged(tmp_path):
    """A file in the paper's trait_data_extract schema (instruction pairs, 40 questions, rubric) loads as is."""
    data = {"instruction": [{"pos": f"You are an evil assistant {i}.", "neg": f"You are a helpful assistant {i}."}
                            for i in range(5)],
            "questions": [f"Paper question {i}?" for i in range(40)],
            "eval_prompt": "Score {question} and {answer} for evil."}
    path = tmp_path / "evil.json"
    path.write_text(json.dumps(data))
    t = load_trait(str(path))
    assert t.name == "evil" and len(t.extract_questions) == 20 and len(t.eval_questions) == 20
    assert t.antonym is None and t.system_prompt("neg", 0).startswith("You are a helpful assistant")


def _write(tmp_path, data, name="mytrait.json"):
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return p


def _valid(n=40):
    return {"instruction": [{"pos": f"Be witty {i}.", "neg": f"Be dry {i}."} for i in range(5)],
            "questions": [f"Question number {i}?" for i in range(n)],
            "eval_prompt": "Rate {question} / {answer}."}


def test_user_file_with_40_questions_is_split(tmp_path):
    t = load_trait(str(_write(tmp_path, _valid())))
    assert t.name == "mytrait" and len(t.extract_questions) == 20 and t.eval_questions[0] == "Question number 20?"


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("eval_prompt"), "field 'eval_prompt': missing"),
    (lambda d: d.update(eval_prompt="no placeholders {question}"), "placeholder {answer} is missing"),
    (lambda d: d["instruction"].pop(), "expected a list of 5 pos/neg pairs, got 4"),
    (lambda d: d["instruction"][2].pop("neg"), "instruction[2]"),
    (lambda d: d["instruction"][1].update(negative=d["instruction"][1].pop("neg")),
     "field 'instruction[1]': missing 'neg' (it has 'negative'; the keys must be 'pos' and 'neg')"),
    (lambda d: d.update(questions=d["questions"][:7]), "expected 20 (or 40 to split), got 7"),
])
def test_malformed_files_name_file_field_and_problem(tmp_path, mutate, message):
    data = _valid()
    mutate(data)
    p = _write(tmp_path, data)
    with pytest.raises(TraitError) as e:
        load_trait(str(p))
    assert str(p) in str(e.value) and message in str(e.value)


def test_invalid_json_and_unknown_trait(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(TraitError, match="not valid JSON"):
        load_trait(str(p))
    with pytest.raises(TraitError, match="unknown trait 'grumpy'"):
        load_trait("grumpy")
    latin = tmp_path / "latin.json"
    latin.write_bytes(json.dumps(_valid()).replace("Question", "Qu\u00e9stion").encode("latin-1"))
    with pytest.raises(TraitError, match=r"latin.json: not UTF-8 .*save the file as UTF-8"):
        load_trait(str(latin))


def test_cli_traits_list_and_show(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["traits", "list"])
    assert res.exit_code == 0 and "sycophantic" in res.output
    res = runner.invoke(app, ["traits", "show", "humorous"])
    assert res.exit_code == 0 and "You are a humorous assistant." in res.output
    data = _valid()
    data["instruction"] = data["instruction"][:3]
    res = runner.invoke(app, ["traits", "show", str(_write(tmp_path, data))])
    assert res.exit_code != 0 and "expected a list of 5 pos/neg pairs" in res.output
    res = runner.invoke(app, ["--help"])
    for cmd in ("extract", "traits", "vector", "judge-eval", "demo"):
        assert cmd in res.output
