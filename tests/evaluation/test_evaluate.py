import json

import pytest
import torch
from tiny import tiny_pair

from personascope.evaluation.capability import load_mc, mc_accuracy, mc_prompt
from personascope.evaluation.evaluate import (
    EvalConfig,
    choose_layer,
    choose_steering,
    evaluate,
    sweep_conditions,
    sweep_rows,
)
from personascope.judges.local import LocalJudge
from personascope.model.adapter import ModelAdapter
from personascope.model.generate import SamplingConfig
from personascope.steering.steer import steer
from personascope.traits.trait import load_trait
from personascope.util.plots import plot_sweep
from personascope.vectors.file import PersonaVector, base_metadata


@pytest.fixture
def setup():
    model, tok = tiny_pair("qwen2", seed=11)
    a = ModelAdapter(model, tok)
    torch.manual_seed(0)
    vecs = {"response_avg": torch.randn(a.n_layers + 1, a.hidden_size)}
    pv = PersonaVector(vecs, torch.ones(a.n_layers + 1), base_metadata(a, "humorous"))
    judge = LocalJudge(model, tok, trait_mode="contrastive", coherence_mode="logprob")
    cfg = EvalConfig(SamplingConfig(samples=1, temperature=0.0, max_new_tokens=5, batch_size=4), n_questions=3)
    return a, pv, judge, cfg


def test_sweep_resumes_and_plots(tmp_path, setup):
    a, pv, judge, cfg = setup
    trait = load_trait("humorous")
    conds = sweep_conditions([1, 2], [-4.0, 0.0, 4.0])
    assert len(conds) == 5  # one shared baseline
    rows = evaluate(a, trait, judge, conds, tmp_path, vector=pv, cfg=cfg)
    assert [r["n"] for r in rows] == [3] * 5
    assert all(0 <= r["trait_mean"] <= 100 for r in rows)
    answers = (tmp_path / "answers.jsonl").read_text().splitlines()
    assert len(answers) == 15
    steered = {r["condition"]: [q["answer"] for q in r["per_question"]] for r in rows}
    assert steered["base"] != steered["L2:c4:response"]
    # rerun: nothing regenerated or re-judged
    again = evaluate(a, trait, judge, conds, tmp_path, vector=pv, cfg=cfg)
    assert (tmp_path / "answers.jsonl").read_text().splitlines() == answers
    assert [r["trait_mean"] for r in again] == [r["trait_mean"] for r in rows]
    # the folder is bound to its settings: another seed, model or vector is refused, naming the difference
    from dataclasses import replace

    from personascope.util.store import RunSettingsError

    with pytest.raises(RunSettingsError, match="seed: 0 -> 5"):
        evaluate(a, trait, judge, conds, tmp_path, vector=pv, cfg=replace(cfg, sampling=replace(cfg.sampling, seed=5)))
    with pytest.raises(RunSettingsError, match="model: 'tiny-qwen2' -> 'tiny-llama'"):
        evaluate(ModelAdapter(*tiny_pair("llama")), trait, judge, conds[:1], tmp_path, cfg=cfg)
    other = PersonaVector({"response_avg": pv.vectors["response_avg"] * 2}, pv.resid_norm, pv.metadata)
    with pytest.raises(RunSettingsError, match="vector: "):
        evaluate(a, trait, judge, conds, tmp_path, vector=other, cfg=cfg)
    assert (tmp_path / "answers.jsonl").read_text().splitlines() == answers
    png = plot_sweep(sweep_rows(rows, [1, 2]), tmp_path / "sweep.png", "t")
    assert png.stat().st_size > 1000
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary[0]["condition"] == "base"


def test_system_prompt_condition(tmp_path, setup):
    from personascope.evaluation.evaluate import Condition

    a, pv, judge, cfg = setup
    trait = load_trait("humorous")
    rows = evaluate(a, trait, judge, [Condition(system=trait.system_prompt("pos", 0), label="system:pos")],
                    tmp_path, cfg=cfg)
    assert "You are a humorous assistant." in rows[0]["system_rendered"]


def test_choose_layer_respects_coherence():
    rows = [
        {"layer": None, "system": None, "coef": 0.0, "trait_mean": 20.0, "coherence_mean": 90.0},
        {"layer": 4, "system": None, "coef": 2.0, "trait_mean": 90.0, "coherence_mean": 40.0},
        {"layer": 8, "system": None, "coef": 2.0, "trait_mean": 60.0, "coherence_mean": 80.0},
        {"layer": 12, "system": None, "coef": 2.0, "trait_mean": 30.0, "coherence_mean": 95.0},
    ]
    best, detail = choose_layer(rows, 75, None)
    assert best == 8 and not detail[4]["eligible"]
    # relative gate: a baseline at 40 lets layers down to 30 through, whatever the absolute bar
    low = [{**r, "coherence_mean": r["coherence_mean"] - 50} for r in rows]
    best, detail = choose_layer(low, 75, 10)
    assert best == 8 and detail[8]["coherence_gate"] == 30 and not detail[4]["eligible"]
    assert choose_layer(low, 75, None)[0] is None


def test_choose_steering_per_direction():
    rows = [
        {"layer": None, "system": None, "coef": 0.0, "trait_mean": 30.0, "coherence_mean": 50.0},
        {"layer": 8, "system": None, "coef": 2.0, "alpha": 0.5, "trait_mean": 60.0, "coherence_mean": 45.0},
        {"layer": 8, "system": None, "coef": 4.0, "alpha": 1.0, "trait_mean": 80.0, "coherence_mean": 20.0},
        {"layer": 8, "system": None, "coef": -2.0, "alpha": -0.5, "trait_mean": 10.0, "coherence_mean": 48.0},
    ]
    got = choose_steering(rows)
    assert got["coherence_gate"] == 40.0
    assert got["plus"]["alpha"] == 0.5 and got["plus"]["delta"] == 30.0  # α 1 broke coherence
    assert got["minus"]["delta"] == -20.0


def test_capability_accuracy_matches_direct_argmax(setup):
    a, pv, judge, cfg = setup
    rows = load_mc()[:12]
    assert len(load_mc()) >= 100
    res = mc_accuracy(a, rows, batch_size=5)
    correct = 0
    tok = a.tokenizer
    for r in rows:
        ids = torch.tensor([a.encode_prompt(mc_prompt(a, r))])
        with torch.no_grad():
            p = a.model(ids).logits[0, -1].softmax(-1)
        scores = [float(p[tok(L, add_special_tokens=False)["input_ids"][0]]
                        + p[tok(" " + L, add_special_tokens=False)["input_ids"][0]]) for L in "ABCD"]
        correct += int(max(range(4), key=lambda i: scores[i]) == r["answer"])
    assert res.accuracy == pytest.approx(correct / len(rows))
    steered = mc_accuracy(a, rows, steerer=steer(a, pv.vector(2) * 50, 2, 1.0, "all"))
    assert 0 <= steered.accuracy <= 1


def test_malformed_mc_row_is_named(tmp_path):
    p = tmp_path / "mc.jsonl"
    p.write_text('{"question": "q", "choices": ["a","b","c","d"], "answer": "B"}\n'
                 '{"question": "q", "choices": ["a"]}\n')
    with pytest.raises(ValueError, match="mc.jsonl:2"):
        load_mc(p)


def test_guard_conditions_in_a_sweep(tmp_path, setup):
    from personascope.cli.printing import print_eval_rows
    from personascope.evaluation.evaluate import Condition, condition_capability, guard_conditions
    from personascope.steering.calibration import GuardCalibration, with_calibration

    a, pv, judge, cfg = setup
    trait = load_trait("humorous")
    with pytest.raises(ValueError, match="no guard calibration"):
        guard_conditions(pv, ["cap"], [])
    low = with_calibration(pv, GuardCalibration(2, -1e-3, 1e-3, 95.0, 10))  # nearly every token is out of range
    conds = [Condition(), Condition(2, -4.0), *guard_conditions(low, ["cap", "conditional"], [-4.0, 0.0]),
             Condition(2, 0.0, guard="cap", hi=1e9),  # a range nothing leaves: a no-op
             Condition(2, 0.0, guard="cap", lo=50.0, hi=50.0)]  # pins the projection far out
    assert [c.key for c in conds[2:]] == ["L2:cap[-,0.001]:response", "L2:c-4-if>0.001:response",
                                          "L2:cap[-,1e+09]:response", "L2:cap[50,50]:response"]
    rows = evaluate(a, trait, judge, conds, tmp_path, vector=low, cfg=cfg)
    by = {r["condition"]: r for r in rows}
    answers = {k: [q["answer"] for q in r["per_question"]] for k, r in by.items()}
    assert answers["L2:cap[-,1e+09]:response"] == answers["base"]
    assert by["L2:cap[-,1e+09]:response"]["guard_touched_mean"] == 0
    cap = by["L2:cap[-,0.001]:response"]
    assert 0 < cap["guard_touched_mean"] <= 5 and cap["guard_answers_touched"] > 0 and cap["guard"] == "cap"
    assert answers["L2:cap[50,50]:response"] != answers["base"]
    assert answers["L2:c-4-if>0.001:response"] != answers["base"]
    assert by["base"]["guard_touched_mean"] is None
    # rerun resumes: the stored touched counts come back unchanged
    again = evaluate(a, trait, judge, conds, tmp_path, vector=low, cfg=cfg)
    assert [r["guard_touched_mean"] for r in again] == [r["guard_touched_mean"] for r in rows]
    change = by["base"]["trait_mean"] - by["L2:c-4:response"]["trait_mean"]
    assert choose_layer(rows, -1.0, None)[1][2]["trait_change"] == pytest.approx(change)  # guard rows are no candidates
    mc = load_mc()[:6]
    assert condition_capability(a, conds[-2], low, mc) == mc_accuracy(a, mc).accuracy
    print_eval_rows(rows, "guard")
