"""End-to-end checks on the real built-in models (marked `model`; slow on CPU, a few minutes)."""

import statistics

import pytest

from personascope.evaluation.evaluate import Condition, EvalConfig, evaluate
from personascope.judges.local import load_local_judge
from personascope.judges.scoring import ScoreCache, judge_answers
from personascope.model.adapter import ModelAdapter
from personascope.model.generate import SamplingConfig
from personascope.model.loading import load_model
from personascope.traits.trait import load_trait
from personascope.vectors.extract import extract_vector, profile

pytestmark = pytest.mark.model
TRAIT = "optimistic"  # the trait the small model expresses best


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    model, tok = load_model()
    adapter = ModelAdapter(model, tok)
    judge = load_local_judge()
    trait = load_trait(TRAIT)
    run = tmp_path_factory.mktemp("extract")
    pv = extract_vector(adapter, trait, judge=judge, config=profile("quick", n_questions=4, max_new_tokens=48),
                        run_dir=run)
    return adapter, judge, trait, pv, run


def test_pos_answers_score_higher_than_neg(pipeline):
    adapter, judge, trait, pv, run = pipeline
    import json

    answers = [json.loads(x) for x in (run / "answers.jsonl").read_text().splitlines()]
    scored = judge_answers(judge, trait, answers, ScoreCache(run / "scores.jsonl"))
    pos = [r["trait_score"] for r in scored if r["side"] == "pos" and r["trait_score"] is not None]
    neg = [r["trait_score"] for r in scored if r["side"] == "neg" and r["trait_score"] is not None]
    assert len(pos) == len(neg) == 20
    assert statistics.fmean(pos) > statistics.fmean(neg)
    assert int(pv.metadata["kept_pairs"]) > 0


def test_steering_moves_the_judged_trait(pipeline, tmp_path):
    adapter, judge, trait, pv, run = pipeline
    layer = pv.default_layer()
    coef = pv.coef_from_alpha(0.5, layer)
    cfg = EvalConfig(SamplingConfig(samples=1, temperature=0.0, max_new_tokens=48, batch_size=6), n_questions=6)
    pos_sys = trait.system_prompt("pos", 0)
    rows = evaluate(adapter, trait, judge, [
        Condition(), Condition(layer, coef, "response"),
        Condition(system=pos_sys, label="pos"), Condition(layer, -coef, "response", system=pos_sys, label="pos-neg"),
    ], tmp_path, vector=pv, cfg=cfg)
    base, up, elicited, suppressed = (r["trait_mean"] for r in rows)
    assert up > base
    assert suppressed < elicited
