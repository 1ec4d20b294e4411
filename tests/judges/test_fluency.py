"""The fluency measure: loops and gibberish are caught, plain answers pass, and the gate uses it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from personascope.evaluation import choose_steering, passes_gate
from personascope.judges import HELDOUT_FROM, FluencyModel, answer_nll, fluency_of, score_fluency, text_features
from personascope.model import ModelAdapter
from personascope.traits import builtin_traits
from personascope.util import data_path

ROOT = Path(__file__).resolve().parents[2]
FEATURES = ROOT / "experiments" / "results" / "fluency" / "features.json"
LOOPS = [  # the 0.5B demo's greedy answers at α ±1 (layer 20), as issue 31 quotes them
    "The future of technology is a suspicious suspicious suspicious suspicious suspicious suspicious suspicious "
    "suspicious suspicious suspicious suspicious suspicious",
    "I believe that the false false false false false false false false false false false false false false",
    "Success comes from your team and your team and your team and your team and your team and your team and your "
    "team and your team",
]
PLAIN = ("Yes, ending extreme poverty worldwide is a realistic goal. With steady economic growth, better access to "
         "education and health care, and international cooperation, many countries have already cut poverty sharply.")


def test_loops_repeat_and_plain_text_does_not():
    for text in LOOPS:
        f = text_features("What do you think about the future?", text)
        assert f["repeat3"] > 0.5 and f["compression"] < 0.35, (text, f)
    f = text_features("Is ending poverty realistic?", PLAIN)
    assert f["repeat3"] == 0.0 and f["compression"] > 0.6


def test_foreign_script_is_measured_against_the_question():
    assert text_features("How do I sleep better?", "Try to go to 睡觉 earlier every night.")["foreign_script"] > 0.05
    assert text_features("如何睡得更好？", "早点睡觉。")["foreign_script"] == 0.0


def test_shipped_model_rejects_loops_text_only_and_keeps_plain_text():
    model = FluencyModel.load()
    flags = [f.fluent for f in score_fluency(None, ["Tell me about the future."] * 3, LOOPS, model=model)]
    assert flags == [False, False, False]
    assert score_fluency(None, ["Is ending poverty realistic?"], [PLAIN], model=model)[0].fluent


def test_low_judge_coherence_vetoes_fluent_text():
    model = FluencyModel.load()
    feats = {**text_features("Is ending poverty realistic?", PLAIN), "nll": None}
    assert fluency_of(model, feats, coherence=90.0).fluent
    assert not fluency_of(model, feats, coherence=10.0).fluent


@pytest.mark.skipif(not FEATURES.exists(), reason="experiments/fluency.py has not cached the set's features")
def test_gate_catches_the_labelled_loops_and_gibberish_held_out():
    """On the real-answer set's held-out third (read labels; NLL cached by experiments/fluency.py), the shipped
    measure flags almost no broken answer fluent and keeps almost every coherent one."""
    model = FluencyModel.load()
    cache = json.loads(FEATURES.read_text())
    broken, coherent = [], []
    for trait in builtin_traits():
        for line in data_path("judge_real", f"{trait}.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r["question_index"] < HELDOUT_FROM or r["id"] not in cache:
                continue
            (broken if r["incoherent"] else coherent).append(fluency_of(model, cache[r["id"]]).fluent)
    assert len(broken) >= 20 and len(coherent) >= 100
    assert sum(broken) / len(broken) <= 0.25, f"{sum(broken)} of {len(broken)} broken answers flagged fluent"
    assert sum(coherent) / len(coherent) >= 0.9


def test_nll_is_exact_under_padding(qwen_tiny: ModelAdapter):
    prompts = [qwen_tiny.prompt("hi"), qwen_tiny.prompt("a much longer question about many things")]
    answers = ["hello there", "yes"]
    both = answer_nll(qwen_tiny, prompts, answers, batch_size=2)
    alone = [answer_nll(qwen_tiny, [p], [a])[0] for p, a in zip(prompts, answers, strict=True)]
    assert both == pytest.approx(alone, abs=1e-4)
    assert answer_nll(qwen_tiny, prompts[:1], [""]) == [None]


def _row(alpha, trait, fluent_share, coherence=90.0):
    return {"layer": None if alpha == 0 else 10, "system": None, "coef": alpha * 4, "alpha": alpha,
            "trait_mean": trait, "coherence_mean": coherence, "fluent_share": fluent_share}


def test_chooser_takes_the_strongest_fluent_alpha_not_the_best_coherence_mean():
    rows = [_row(0, 40, 1.0), _row(0.5, 55, 1.0), _row(1.0, 70, 0.9), _row(1.5, 90, 0.5, coherence=80.0),
            _row(-0.5, 30, 1.0), _row(-1.0, 20, 0.5, coherence=75.0)]
    pick = choose_steering(rows)
    assert pick["plus"]["alpha"] == 1.0  # 1.5 has the bigger effect and a passing mean coherence, but loops
    assert pick["minus"]["alpha"] == -0.5
    assert not passes_gate(rows[3], gate=50.0) and passes_gate(rows[2], gate=50.0)
