"""The demo's steering step on a tiny model: α chosen by the fluency gate, every answer's flag in the report."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import tiny_pair

from personascope.cli.demo import ALPHA_LADDER, choose_alphas, write_report
from personascope.evaluation import EvalConfig
from personascope.judges import FluencyModel, LocalJudge
from personascope.model import ModelAdapter, SamplingConfig
from personascope.traits import load_trait
from personascope.vectors import PersonaVector, base_metadata

CFG = EvalConfig(SamplingConfig(samples=1, temperature=0.0, max_new_tokens=12, batch_size=2), n_questions=2)


@pytest.fixture
def setup():
    model, tok = tiny_pair("qwen2")
    adapter = ModelAdapter(model, tok)
    gen = torch.Generator().manual_seed(0)
    vecs = {s: torch.randn(adapter.n_layers + 1, adapter.hidden_size, generator=gen)
            for s in ("response_avg", "prompt_avg", "prompt_last")}
    pv = PersonaVector(vecs, torch.ones(adapter.n_layers + 1), base_metadata(adapter, "optimistic"))
    judge = LocalJudge(model, tok, name="local:tiny")
    return adapter, pv, judge


def test_ladder_stops_at_broken_text_and_the_report_flags_it(setup, tmp_path):
    # a random tiny model writes byte salad: the shipped fluency model flags every answer, so each direction
    # stops after its first rung and no α passes
    adapter, pv, judge = setup
    rows, choice = choose_alphas(adapter, load_trait("optimistic"), judge, pv, 2, tmp_path, CFG)
    assert [r["alpha"] or 0.0 for r in rows] == [0.0, -ALPHA_LADDER[0], ALPHA_LADDER[0]]
    assert all(r["fluent_share"] == 0.0 for r in rows)
    assert choice["plus"] is None and choice["minus"] is None
    stored = [json.loads(line) for line in (tmp_path / "fluency.jsonl").read_text().splitlines()]
    assert len(stored) == 6 and {r["fluent"] for r in stored} == {False} and all("nll" in r for r in stored)
    plot = tmp_path / "sweep.png"
    plot.write_bytes(b"")
    html = write_report(rows, tmp_path / "report.html", "optimistic", "tiny", plot).read_text()
    assert html.count("not fluent") == 6


def test_ladder_climbs_while_answers_stay_fluent(setup, tmp_path, monkeypatch):
    # with a fluency model that passes everything the ladder runs to its end in both directions
    adapter, pv, judge = setup
    lenient = FluencyModel([0.0] * 5, [1.0] * 5, [0.0] * 5, 10.0, 0.5, 0.0)
    monkeypatch.setattr(FluencyModel, "load", classmethod(lambda cls, path=None: lenient))
    monkeypatch.setattr("personascope.judges.fluency.MIN_COHERENCE", -1.0)
    rows, choice = choose_alphas(adapter, load_trait("optimistic"), judge, pv, 2, tmp_path, CFG)
    assert len(rows) == 1 + 2 * len(ALPHA_LADDER)
    for side in ("plus", "minus"):  # a direction that moved the judged trait picks the ladder's strongest α
        assert choice[side] is None or abs(choice[side]["alpha"]) == ALPHA_LADDER[-1]


def test_demo_judge_falls_back_to_the_packaged_probe(monkeypatch, setup):
    """A subject without shipped probe weights is judged by the package's probe (its own model), not the
    slow rubric LLM judge; naming a judge still picks the LLM judge."""
    from personascope.cli import demo
    from personascope.model import DEFAULT_MODEL

    adapter = setup[0]
    called: dict = {}
    monkeypatch.setattr(demo, "load_probe_judge", lambda name, device=None: called.setdefault("probe", name))
    monkeypatch.setattr(demo, "load_local_judge", lambda name, device=None: called.setdefault("local", name))
    demo.demo_judge(adapter, None, None)
    demo.demo_judge(adapter, "some-judge", None)
    assert called == {"probe": DEFAULT_MODEL, "local": "some-judge"}
