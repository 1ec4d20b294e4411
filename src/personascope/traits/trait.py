"""Trait data: 5 pos/neg instruction pairs, extraction and evaluation questions, a judge rubric.

Files use the paper's JSON shape, so the paper's own files load unchanged. A trait
is given as a built-in name, a directory (with extract.json and eval.json), a file inside a
`trait_data_extract/` folder (its `trait_data_eval/` sibling is found), or a single file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

N_PAIRS = 5
N_QUESTIONS = 20

# how every judge prompt (a trait's rubric, the coherence rubric) shows the question and the answer
QA_BLOCK = """[QUESTION START]
{question}
[QUESTION END]

[ANSWER START]
{answer}
[ANSWER END]"""


def fill_rubric(template: str, question: str, answer: str) -> str:
    """A judge prompt with its `{question}` and `{answer}` placeholders filled."""
    return template.replace("{question}", question).replace("{answer}", answer)


class TraitError(ValueError):
    """A trait file is malformed; the message names the file, the field and the problem."""


@dataclass(frozen=True)
class Trait:
    """One trait's data, ready for the pipeline."""

    name: str
    instructions: list[dict[str, str]]
    extract_questions: list[str]
    eval_questions: list[str]
    eval_prompt: str
    antonym: str | None = None
    judge_examples: list[dict] = field(default_factory=list)
    source: str = ""

    def system_prompt(self, side: str, index: int) -> str:
        """The system prompt for instruction pair `index` on side 'pos' or 'neg'."""
        name = self.name if side == "pos" else (self.antonym or "helpful")
        article = "an" if name[:1].lower() in "aeiou" else "a"
        return f"You are {article} {name} assistant. {self.instructions[index][side]}"

    def rubric(self, question: str, answer: str) -> str:
        return self.eval_prompt.replace("{question}", question).replace("{answer}", answer)


def _fail(path: str, fieldname: str, problem: str) -> TraitError:
    return TraitError(f"{path}: field {fieldname!r}: {problem}")


def validate_trait_dict(data: object, path: str, n_questions: int | None = N_QUESTIONS) -> dict:
    """Check the paper's shape; raise TraitError naming the file, field and problem."""
    if not isinstance(data, dict):
        raise TraitError(f"{path}: expected a JSON object, got {type(data).__name__}")
    for key in ("instruction", "questions", "eval_prompt"):
        if key not in data:
            raise _fail(path, key, "missing")
    inst = data["instruction"]
    if not isinstance(inst, list) or len(inst) != N_PAIRS:
        raise _fail(path, "instruction", f"expected a list of {N_PAIRS} pos/neg pairs, got "
                    f"{len(inst) if isinstance(inst, list) else type(inst).__name__}")
    for i, pair in enumerate(inst):
        if not isinstance(pair, dict):
            raise _fail(path, f"instruction[{i}]", "expected an object with 'pos' and 'neg'")
        missing = [k for k in ("pos", "neg") if k not in pair]
        if missing:
            extra = sorted(set(pair) - {"pos", "neg"})
            raise _fail(path, f"instruction[{i}]", f"missing {' and '.join(repr(k) for k in missing)}"
                        + (f" (it has {', '.join(repr(k) for k in extra)}; the keys must be 'pos' and 'neg')"
                           if extra else ""))
        for side in ("pos", "neg"):
            if not isinstance(pair[side], str) or not pair[side].strip():
                raise _fail(path, f"instruction[{i}].{side}", "expected a non-empty string")
    qs = data["questions"]
    if not isinstance(qs, list) or not all(isinstance(q, str) and q.strip() for q in qs):
        raise _fail(path, "questions", "expected a list of non-empty strings")
    if n_questions is not None and len(qs) != n_questions:
        raise _fail(path, "questions", f"expected {n_questions} questions, got {len(qs)}")
    if len(set(qs)) != len(qs):
        dup = next(q for q in qs if qs.count(q) > 1)
        raise _fail(path, "questions", f"duplicate question {dup!r}")
    ep = data["eval_prompt"]
    if not isinstance(ep, str):
        raise _fail(path, "eval_prompt", "expected a string")
    for ph in ("{question}", "{answer}"):
        if ph not in ep:
            raise _fail(path, "eval_prompt", f"placeholder {ph} is missing")
    if "antonym" in data and not isinstance(data["antonym"], str):
        raise _fail(path, "antonym", "expected a string")
    _check_judge_examples(data.get("judge_examples", []), path)
    return data


def _check_judge_examples(examples: object, path: str) -> None:
    """The fewshot judge's examples: a list of {question, answer: non-empty strings, score: a number 0..100}."""
    if not isinstance(examples, list):
        raise _fail(path, "judge_examples", "expected a list of {question, answer, score} objects")
    for i, ex in enumerate(examples):
        where = f"judge_examples[{i}]"
        if not isinstance(ex, dict):
            raise _fail(path, where, "expected an object with 'question', 'answer' and 'score'")
        for key in ("question", "answer"):
            if not isinstance(ex.get(key), str) or not ex[key].strip():
                raise _fail(path, f"{where}.{key}", "expected a non-empty string")
        score = ex.get("score")
        if isinstance(score, bool) or not isinstance(score, int | float) or not 0 <= score <= 100:
            raise _fail(path, f"{where}.score", f"expected a number from 0 to 100, got {score!r}")


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TraitError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise TraitError(f"{path}: not UTF-8 ({e.reason} at byte {e.start}); save the file as UTF-8") from None
    except json.JSONDecodeError as e:
        raise TraitError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise TraitError(f"{path}: JSON nested too deeply to read") from None
    except OSError as e:
        raise TraitError(f"{path}: cannot be read ({e.strerror or e})") from None


def builtin_traits() -> list[str]:
    """Names of the traits shipped with personascope."""
    folder = resources.files("personascope") / "data" / "traits" / "extract"
    return sorted(p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json"))


def _builtin_paths(name: str) -> tuple[Path, Path]:
    base = Path(str(resources.files("personascope") / "data" / "traits"))
    return base / "extract" / f"{name}.json", base / "eval" / f"{name}.json"


def _locate(spec: str) -> tuple[str, Path, Path | None]:
    """(name, extract file, eval file or None) for any accepted way of naming a trait."""
    path = Path(spec)
    if not path.exists() and spec in builtin_traits():
        ex, ev = _builtin_paths(spec)
        return spec, ex, ev
    if path.is_dir():
        ex, ev = path / "extract.json", path / "eval.json"
        return path.name, ex, ev if ev.exists() else None
    if path.suffix == ".json" or path.exists():
        if not path.exists():
            raise TraitError(f"{path}: file not found")
        name = path.stem
        if path.parent.name == "trait_data_extract":
            sib = path.parent.parent / "trait_data_eval" / path.name
            return name, path, sib if sib.exists() else None
        if path.parent.name == "trait_data_eval":
            sib = path.parent.parent / "trait_data_extract" / path.name
            return name, sib, path
        sib = path.with_name(f"{name}.eval.json")
        return name, path, sib if sib.exists() else None
    raise TraitError(f"unknown trait {spec!r}: not a built-in ({', '.join(builtin_traits())}) and no such file")


def load_trait(spec: str) -> Trait:
    """Load and validate a trait by built-in name or path; TraitError says what is wrong."""
    name, ex_path, ev_path = _locate(spec)
    raw = _read_json(ex_path)
    if ev_path is None:
        # a single file: 40 questions are split 20/20, 20 questions give extraction only
        ex = validate_trait_dict(raw, str(ex_path), n_questions=None)
        qs = ex["questions"]
        if len(qs) == 2 * N_QUESTIONS:
            ex_qs, ev_qs = qs[:N_QUESTIONS], qs[N_QUESTIONS:]
        elif len(qs) == N_QUESTIONS:
            ex_qs, ev_qs = qs, []
        else:
            raise _fail(str(ex_path), "questions", f"expected {N_QUESTIONS} (or {2 * N_QUESTIONS} to split), "
                        f"got {len(qs)}")
    else:
        ex = validate_trait_dict(raw, str(ex_path))
        ev = validate_trait_dict(_read_json(ev_path), str(ev_path))
        ex_qs, ev_qs = ex["questions"], ev["questions"]
    overlap = set(ex_qs) & set(ev_qs)
    if overlap:
        raise TraitError(f"{ev_path}: field 'questions': {len(overlap)} evaluation questions also appear in the "
                         f"extraction split, e.g. {sorted(overlap)[0]!r}")
    return Trait(
        name=name,
        instructions=[{"pos": p["pos"], "neg": p["neg"]} for p in ex["instruction"]],
        extract_questions=list(ex_qs),
        eval_questions=list(ev_qs),
        eval_prompt=ex["eval_prompt"],
        antonym=ex.get("antonym"),
        judge_examples=list(ex.get("judge_examples", [])),
        source=str(ex_path),
    )


def load_ladder(trait: str) -> list[str]:
    """The built-in ladder of system prompts, from trait-suppressing to trait-eliciting."""
    path = Path(str(resources.files("personascope") / "data" / "ladders" / f"{trait}.json"))
    if not path.exists():
        raise TraitError(f"no built-in system-prompt ladder for trait {trait!r}; pass your own with --ladder FILE")
    return json.loads(path.read_text())
