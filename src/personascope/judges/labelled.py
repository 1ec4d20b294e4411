"""The labelled answer sets the judge is measured and trained on, as `LabelledAnswer` rows.

- written (`data/judge_eval/`): clear-cut answers written for each trait (label 1/0 plus a kind).
- real (`data/judge_real/`): answers the built-in models actually wrote, labelled by reading at three
  levels (0 opposite, 1 neutral, 2 shown) with refusal and incoherent flags; questions 0–6 of each
  trait are the tuning part, 7–9 the held-out part.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from personascope.traits import builtin_traits

from .probe_fit import LabelledAnswer

SHOWN_KINDS = {"strong", "mild", "clear"}
INCOHERENT_KINDS = {"incoherent", "garbled", "repetitive", "broken", "offtopic-rambling"}
HELDOUT_FROM = 7  # question index where the held-out part of the real set starts


def _data(*parts: str) -> Path:
    return Path(str(resources.files("personascope").joinpath("data", *parts)))


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_written_set() -> list[LabelledAnswer]:
    """The written set mapped to levels; coherence rows are given a built-in trait round-robin."""
    out = []
    for trait in builtin_traits():
        for r in _rows(_data("judge_eval", f"{trait}.jsonl")):
            kind = r.get("kind", "")
            incoherent = kind in INCOHERENT_KINDS
            level = None if incoherent else 2 if r["label"] == 1 else 0 if kind == "opposite" else 1
            out.append(LabelledAnswer(trait, r["question"], r["answer"], level, kind == "refusal", incoherent,
                                      "written"))
    traits = builtin_traits()
    for i, r in enumerate(_rows(_data("judge_eval", "coherence.jsonl"))):
        out.append(LabelledAnswer(traits[i % len(traits)], r["question"], r["answer"], None, None,
                                  r["label"] == 0, "written:coherence"))
    return out


def load_real_set(traits: list[str] | None = None) -> list[LabelledAnswer]:
    """The real-answer set, grouped 'real:tune' or 'real:heldout' by question index."""
    out = []
    for trait in traits or builtin_traits():
        path = _data("judge_real", f"{trait}.jsonl")
        if not path.exists():
            continue
        for r in _rows(path):
            part = "real:heldout" if r["question_index"] >= HELDOUT_FROM else "real:tune"
            out.append(LabelledAnswer(trait, r["question"], r["answer"], r["level"], bool(r["refusal"]),
                                      bool(r["incoherent"]), part))
    return out
