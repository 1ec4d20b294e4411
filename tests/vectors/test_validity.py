import json

import pytest
import torch
from tiny import tiny_pair

from personascope.judges.local import LocalJudge
from personascope.model.adapter import ModelAdapter
from personascope.traits.trait import load_trait
from personascope.vectors.extract import extract_vector, profile
from personascope.vectors.file import load_vector
from personascope.vectors.validity import (
    ValidityReport,
    choose_layer,
    held_out_auroc,
    label_agreement,
    ladder_spearman,
    split_half_cosine,
    validity_report,
)


def _pairs(signal_layers=(1,), n_q=6, per_q=3, d=16, layers=3, seed=0):
    """Pair activations where `signal_layers` carry a fixed direction (+ on pos, − on neg) and the rest noise."""
    g = torch.Generator().manual_seed(seed)
    n = n_q * per_q
    pos, neg = torch.randn(n, layers, d, generator=g), torch.randn(n, layers, d, generator=g)
    direction = torch.zeros(d)
    direction[0] = 3.0
    for layer in signal_layers:
        pos[:, layer] += direction
        neg[:, layer] -= direction
    return pos, neg, [i // per_q for i in range(n)]


def test_held_out_auroc_sees_signal_and_not_noise():
    pos, neg, qs = _pairs()
    au = held_out_auroc(pos, neg, qs)
    assert au[1] == 1.0
    assert 0.2 < au[0] < 0.8 and 0.2 < au[2] < 0.8  # noise: chance level, not separated


def test_held_out_vector_never_sees_its_test_questions():
    # pos and neg differ only through a question-specific offset: a vector that saw the test questions would
    # separate them; one built from the other questions cannot
    g = torch.Generator().manual_seed(1)
    n_q, d = 8, 16
    offsets = torch.randn(n_q, d, generator=g) * 5
    qs = [q for q in range(n_q) for _ in range(4)]
    pos = torch.stack([offsets[q] for q in qs])[:, None] + 0.01 * torch.randn(len(qs), 1, d, generator=g)
    neg = -torch.stack([offsets[q] for q in qs])[:, None] + 0.01 * torch.randn(len(qs), 1, d, generator=g)
    assert held_out_auroc(pos, neg, qs)[0] < 0.8


def test_split_half_cosine():
    pos, neg, qs = _pairs()
    cos = split_half_cosine(pos, neg, qs)
    assert cos[1] > 0.9 and abs(cos[0]) < 0.6
    assert held_out_auroc(pos[:3], neg[:3], [0, 0, 0]) == [None, None, None]  # one question: nothing to hold out


def test_ladder_and_labels_flip_with_the_vector(qwen_tiny):
    trait = load_trait("optimistic")
    v = torch.randn(qwen_tiny.n_layers + 1, qwen_tiny.hidden_size, generator=torch.Generator().manual_seed(0))
    up, n = ladder_spearman(qwen_tiny, v, trait, n_questions=2)
    down, _ = ladder_spearman(qwen_tiny, -v, trait, n_questions=2)
    assert n == 9 * 2 and len(up) == qwen_tiny.n_layers + 1
    assert all(u is None or abs(u + d) < 1e-3 for u, d in zip(up, down, strict=True))
    au, sp, n_lab = label_agreement(qwen_tiny, v, "optimistic")
    au2, sp2, _ = label_agreement(qwen_tiny, -v, "optimistic")
    assert n_lab >= 20
    assert all(a is None or abs(a + b - 1) < 1e-3 for a, b in zip(au, au2, strict=True))  # rounded to 4 places
    assert label_agreement(qwen_tiny, v, "no-such-trait") == (None, None, 0)


def test_report_problems_roundtrip_and_layer_choice():
    rep = ValidityReport(layers=[0, 1, 2, 3, 4], held_out_auroc=[0.5, 0.6, 0.99, 0.97, 0.9],
                         split_half_cosine=[0.1, 0.5, 0.95, 0.8, 0.7], ladder_spearman=[0.0, 0.1, 0.9, 0.5, 0.2])
    rep.layer = choose_layer(rep)
    assert rep.layer == 2 and rep.valid and rep.problems() == []
    assert rep.problems(3) == ["split half cosine 0.80 < 0.9", "ladder spearman 0.50 < 0.8"]
    again = ValidityReport.from_dict(json.loads(json.dumps(rep.to_dict())))
    assert again == rep
    with pytest.raises(ValueError, match="layer 9"):
        rep.at(9)


def test_extraction_stores_report_in_summary_and_vector(tmp_path):
    model, tok = tiny_pair("qwen2", seed=3)
    a = ModelAdapter(model, tok)
    judge = LocalJudge(model, tok, trait_mode="contrastive", coherence_mode="logprob")
    cfg = profile("quick", samples=1, n_questions=3, n_instructions=2, max_new_tokens=5, batch_size=6,
                  filter="none")
    extract_vector(a, "optimistic", judge=judge, config=cfg, run_dir=tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    rep = ValidityReport.from_dict(summary["validity"])
    assert len(rep.held_out_auroc) == a.n_layers + 1 and rep.counts["questions"] == 3
    assert rep.ladder_spearman is not None and rep.label_auroc is not None
    pv = load_vector(tmp_path / "vector.safetensors")
    assert json.loads(pv.metadata["validity"])["layer"] == rep.layer == pv.best_layer
    assert any("every pair kept" in d for d in json.loads(pv.metadata["departures"]))
    assert (tmp_path / "validity.png").stat().st_size > 1000
    # direct call agrees with what extraction stored
    direct = validity_report(None, pv.vectors["response_avg"], None, None, [], load_trait("optimistic"))
    assert direct.held_out_auroc == [None] * (a.n_layers + 1) and direct.notes
