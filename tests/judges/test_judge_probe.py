"""The probe judge: prefix-cached features equal uncached ones, scores ignore batching, heads learn."""

from __future__ import annotations

import torch
from tiny import tiny_pair

from personascope.judges.local import JudgeRequest
from personascope.judges.probe import ProbeFeatures, ProbeJudge, ProbeWeights, level_score
from personascope.judges.probe_fit import LabelledAnswer, fit_heads, head_target
from personascope.model.adapter import ModelAdapter
from personascope.traits.trait import load_trait
from personascope.util.stats import auroc, spearman


def _adapter() -> ModelAdapter:
    model, tok = tiny_pair("qwen2")
    return ModelAdapter(model.float(), tok)


def test_level_score_orders_opposite_neutral_shown():
    assert level_score(0.0, 0.0) == 0.0
    assert abs(level_score(1.0, 0.0) - 100 / 3) < 1e-9
    assert level_score(1.0, 1.0) == 100.0
    assert level_score(0.0, 1.0) == 100.0  # ge2 implies ge1


def test_prefix_cached_features_equal_a_full_forward():
    ad = _adapter()
    fx = ProbeFeatures(ad, [0, 2, 3])
    trait = load_trait("optimistic")
    feats = fx.features(trait, "Will it rain?", "Sunny days ahead, surely!")
    full, _ = fx.prompt(trait, "Will it rain?", "Sunny days ahead, surely!")
    ids = torch.tensor([ad.encode_prompt(full)])
    with torch.no_grad():
        hs = ad.model(input_ids=ids, output_hidden_states=True).hidden_states
    # rows 0 and 2 are un-normed residuals; the last HF hidden state is final-normed, so compare 0 and 2
    d = ad.hidden_size
    assert torch.allclose(feats[:d], hs[0][0, -1].float(), atol=1e-5)
    assert torch.allclose(feats[d : 2 * d], hs[2][0, -1].float(), atol=1e-4)


def _weights(ad: ModelAdapter, layers: list[int]) -> ProbeWeights:
    g = torch.Generator().manual_seed(0)
    f = len(layers) * ad.hidden_size
    heads = {h: (torch.randn(f, generator=g, dtype=torch.float64), 0.1) for h in ("ge1", "ge2", "refusal",
                                                                                   "incoherent")}
    return ProbeWeights(layers, torch.zeros(f, dtype=torch.float64), torch.ones(f, dtype=torch.float64), heads)


def test_scores_do_not_depend_on_batch_or_order():
    ad = _adapter()
    trait = load_trait("optimistic")
    reqs = [JudgeRequest("trait", f"Question {i}?", f"Answer number {i} " * (i + 1), trait) for i in range(5)]
    alone = [ProbeJudge(ad, _weights(ad, [1, 3]), "probe").score([r])[0] for r in reqs]
    batch = ProbeJudge(ad, _weights(ad, [1, 3]), "probe").score(list(reversed(reqs)))[::-1]
    assert alone == batch
    assert all(s is not None and 0 <= s <= 100 for s in alone)


def test_weights_round_trip(tmp_path):
    ad = _adapter()
    w = _weights(ad, [1, 3])
    w2 = ProbeWeights.load(w.save(tmp_path / "p.safetensors"))
    x = torch.randn(4, 2 * ad.hidden_size)
    for h, p in w.probabilities(x).items():
        assert torch.allclose(p, w2.probabilities(x)[h], atol=1e-5)


def test_heads_learn_a_separable_direction():
    g = torch.Generator().manual_seed(1)
    direction = torch.randn(16, generator=g)
    rows, feats = [], []
    for i in range(60):
        level = i % 3
        feats.append(torch.randn(16, generator=g) * 0.3 + (level - 1) * direction)
        rows.append(LabelledAnswer("optimistic", "q", f"a{i}", level, False, False))
    w = fit_heads(torch.stack(feats), rows, [1], l2=0.01)
    p = w.probabilities(torch.stack(feats))
    scores = [level_score(float(a), float(b)) for a, b in zip(p["ge1"], p["ge2"], strict=True)]
    assert auroc(scores, [int(r.level == 2) for r in rows]) > 0.95
    assert spearman([float(r.level) for r in rows], scores) > 0.8
    assert "refusal" not in w.heads  # one class only: no head


def test_head_targets_skip_rows_without_the_label():
    r = LabelledAnswer("evil", "q", "a", None, True, None)
    assert head_target(r, "ge1") is None and head_target(r, "refusal") == 1.0 and head_target(r, "incoherent") is None


def test_refusals_are_recorded_and_drop_their_pair(tmp_path):
    from personascope.judges.scoring import ScoreCache, judge_answers
    from personascope.vectors.extract import PROFILES, filter_pairs

    ad = _adapter()
    w = _weights(ad, [1])
    w.heads["refusal"] = (torch.zeros_like(w.heads["refusal"][0]), 50.0)  # every answer reads as a refusal
    judge = ProbeJudge(ad, w, "probe")
    trait = load_trait("optimistic")
    recs = [{"question_text": "Q?", "answer": a, "side": side, "instruction": 0, "question": 0, "sample": 0}
            for a, side in (("Great things ahead!", "pos"), ("I can't help with that.", "neg"))]
    scored = judge_answers(judge, trait, recs, ScoreCache(tmp_path / "scores.jsonl"))
    assert all(r["refusal"] for r in scored)
    result = filter_pairs(scored, PROFILES["quick"])
    assert not result.kept and result.dropped["refusal"] == 1


def test_real_labelled_set_maps_levels_and_leaves_out_refusals():
    from personascope.judges.quality import labelled_set

    rows = labelled_set("optimistic", "real")
    assert rows and all(r["label"] in (0, 1) for r in rows)
    assert all(not r["refusal"] and not r["incoherent"] for r in rows)
    assert {r["label"] for r in rows} == {0, 1}
    assert all(r["label"] == int(r["level"] == 2) for r in rows)
