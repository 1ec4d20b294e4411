import json

import pytest
import torch
from tiny import tiny_pair

from personascope.model.adapter import ModelAdapter
from personascope.monitor import DriftRule, DriftVector, Normal, read_conversations, run_drift, trajectories, trajectory
from personascope.monitor.trace import project_prompts
from personascope.vectors.file import PersonaVector, base_metadata

CONVS = [
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi there"},
     {"role": "assistant", "content": "hello! how can I help?"}, {"role": "user", "content": "tell me a joke"},
     {"role": "assistant", "content": "why did the chicken cross"}, {"role": "user", "content": "ok"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "a much longer question about the weather and the sea, please"},
     {"role": "assistant", "content": "sunny"}, {"role": "user", "content": "and tomorrow?"},
     {"role": "assistant", "content": "rain, maybe, with some wind from the west"}],
]


def _setup(seed: int = 3):
    model, tok = tiny_pair("qwen2", seed=seed)
    a = ModelAdapter(model, tok)
    g = torch.Generator().manual_seed(1)
    vecs = []
    for name in ("opt", "hum"):
        pv = PersonaVector({"response_avg": torch.randn(a.n_layers + 1, a.hidden_size, generator=g)},
                           torch.ones(a.n_layers + 1), base_metadata(a, name))
        vecs.append(pv)
    return a, [DriftVector("opt", vecs[0], 2, Normal(0.1, 0.5, -0.2, 0.25)), DriftVector("hum", vecs[1], 3)]


def test_batched_left_padding_matches_one_conversation_at_a_time():
    a, dvs = _setup()
    batched = trajectories(a, CONVS, dvs, batch_size=3)
    for conv, tb in zip(CONVS, batched, strict=True):
        alone = trajectory(a, conv, dvs)
        assert len(alone.turns) == len(tb.turns)
        for p, q in zip(alone.turns, tb.turns, strict=True):
            assert (p.turn, p.message, p.n_tokens) == (q.turn, q.message, q.n_tokens)
            for name in ("opt", "hum"):
                assert q.pre[name] == pytest.approx(p.pre[name], abs=1e-4)
                if p.response[name] is None:
                    assert q.response[name] is None
                else:
                    assert q.response[name] == pytest.approx(p.response[name], abs=1e-4)


def test_points_equal_the_prompt_projections_of_each_prefix():
    """pre = last token of the rendered prefix (the paper's predictor); response = the answer's response_avg."""
    a, dvs = _setup()
    conv = CONVS[0]
    traj = trajectories(a, [conv], dvs)[0]
    assert [t.message for t in traj.turns] == [2, 4, 6]  # the open last user turn gives a pending point
    assert traj.turns[-1].n_tokens == 0 and traj.turns[-1].response["opt"] is None
    for t in traj.turns:
        prompt = a.render(conv[: t.message], add_generation_prompt=True)
        pre = project_prompts(a, [prompt], dvs[0].vector, 2).column()[0]
        assert t.pre["opt"] == pytest.approx(pre, abs=1e-4)
        if t.n_tokens:
            resp = project_prompts(a, [prompt], dvs[0].vector, 2, span="response_avg",
                                   answers=[conv[t.message]["content"]]).column()[0]
            assert t.response["opt"] == pytest.approx(resp, abs=1e-4)
            assert t.response_z["opt"] == pytest.approx((resp + 0.2) / 0.25, abs=1e-3)
        assert t.pre_z["opt"] == pytest.approx((t.pre["opt"] - 0.1) / 0.5, abs=1e-3)
        assert t.pre_z["hum"] is None  # no normal range: no z-score


def test_rule_run_and_rise():
    rule = DriftRule(z=2.0, turns=2)
    assert rule.first_alert("v", [0, 2.5, 1.0, 2.1, 2.2]).turn == 4
    assert rule.first_alert("v", [0, 2.5, None, 2.1]) is None
    rise = DriftRule(z=9, turns=2, rise=1.5)
    alert = rise.first_alert("v", [-1.0, 0.0, 0.6])
    assert (alert.turn, alert.reason) == (2, "rise")
    assert rule.score([0, 1, 3, 3]) == 3.0
    with pytest.raises(ValueError, match="span"):
        DriftRule(span="tokens")


def test_malformed_lines_are_reported_by_number(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join([json.dumps({"messages": CONVS[1], "id": "a"}), "{not json",
                               json.dumps({"messages": [{"role": "tool", "content": "x"}]}),
                               json.dumps({"nothing": 1}), json.dumps({"messages": CONVS[1]})]) + "\n")
    items = list(read_conversations(path))
    assert [(type(i).__name__, i.line) for i in items] == [("Conversation", 1), ("BadLine", 2), ("BadLine", 3),
                                                           ("BadLine", 4), ("Conversation", 5)]
    assert items[4].id == "line-5" and "tool" in items[2].error


def test_run_drift_flags_reports_and_resumes(tmp_path):
    a, dvs = _setup()
    data = tmp_path / "c.jsonl"
    lines = [json.dumps({"id": f"c{i}", "messages": c}) for i, c in enumerate(CONVS)]
    data.write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    rule = DriftRule(z=-100.0, turns=1)  # everything is flagged on 'opt'
    out = tmp_path / "run"
    res = run_drift(a, data, dvs, rule, out, batch_size=2)
    assert res.conversations == 3 and res.flagged["opt"] == ["c0", "c1", "c2"] and res.flagged["hum"] == []
    assert res.errors[0]["line"] == 2
    turns = [json.loads(x) for x in (out / "turns.jsonl").read_text().splitlines()]
    assert len(turns) == 3 + 1 + 2
    html = (out / "report.html").read_text()
    assert html.count('class="conv"') == 3 and "line 2" in html and "data:image/png;base64," in html
    # resume: nothing is recomputed, the result is the same
    first = (out / "trajectories.jsonl").read_text()
    res2 = run_drift(a, data, dvs, rule, out, batch_size=2)
    assert (out / "trajectories.jsonl").read_text() == first and res2.flagged == res.flagged
    with pytest.raises(ValueError, match="other settings"):
        run_drift(a, data, dvs, DriftRule(z=1.0), out, settings={"rule": "other"})
