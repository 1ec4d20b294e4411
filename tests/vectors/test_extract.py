import json

import pytest
import torch
from tiny import tiny_pair

import personascope.model.generate as gen
from personascope.judges.local import LocalJudge
from personascope.model.activations import SPANS, collect_spans
from personascope.model.adapter import ModelAdapter, block_output
from personascope.traits.trait import load_trait
from personascope.vectors.extract import (
    answer_jobs,
    extract_vector,
    filter_pairs,
    generate_answers,
    profile,
    vector_from_pairs,
)
from personascope.vectors.file import load_vector


def _cfg(**kw):
    base = dict(samples=1, n_questions=2, n_instructions=2, max_new_tokens=6, batch_size=3,
                pos_threshold=0.0, neg_threshold=101.0, coherence_threshold=0.0)
    base.update(kw)
    return profile("quick", **base)


def _naive_spans(a: ModelAdapter, prompt_ids, resp_ids):
    """One sequence at a time with output_hidden_states (block output for the last layer)."""
    last = {}
    hd = a.blocks[-1].register_forward_hook(lambda m, i, o: last.__setitem__("h", block_output(o)))
    with torch.no_grad():
        hs = list(a.model(torch.tensor([prompt_ids + resp_ids]), output_hidden_states=True).hidden_states)
    hd.remove()
    hs[-1] = last["h"]
    n = len(prompt_ids)
    return {
        "prompt_avg": torch.stack([h[0, :n].mean(0) for h in hs]),
        "response_avg": torch.stack([h[0, n:].mean(0) for h in hs]),
        "prompt_last": torch.stack([h[0, n - 1] for h in hs]),
    }


def test_vector_equals_naive_reference(tmp_path):
    model, tok = tiny_pair("llama", seed=2)
    a = ModelAdapter(model, tok)
    trait = load_trait("humorous")
    judge = LocalJudge(model, tok, trait_mode="contrastive", coherence_mode="logprob")
    cfg = _cfg()
    pv = extract_vector(a, trait, judge=judge, config=cfg, run_dir=tmp_path, plots=True)
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 2 * 2 * 2
    by_side = {"pos": [], "neg": []}
    for r in sorted(answers, key=lambda r: (r["instruction"], r["question"])):
        p, resp = a.encode_pair(a.prompt(r["question_text"], r["system"]), r["answer"])
        by_side[r["side"]].append(_naive_spans(a, p, resp))
    for span in SPANS:
        ref = (torch.stack([x[span] for x in by_side["pos"]]).mean(0)
               - torch.stack([x[span] for x in by_side["neg"]]).mean(0))
        assert torch.allclose(pv.vectors[span], ref, atol=1e-5), span
    loaded = load_vector(tmp_path / "vector.safetensors")
    assert loaded.metadata["kept_pairs"] == "4" and loaded.metadata["judge"] == judge.name
    assert torch.equal(loaded.vectors["response_avg"], pv.vectors["response_avg"])
    assert loaded.resid_norm.shape == (a.n_layers + 1,)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["kept_pairs"] == 4 and summary["judge_modes"]["trait"] == "contrastive"
    for png in ("vector_norms.png", "score_histograms.png"):
        assert (tmp_path / png).stat().st_size > 1000


@pytest.mark.parametrize("family", ["qwen2", "gpt2", "gemma2"])
def test_spans_independent_of_batch_size_and_padding(family):
    model, tok = tiny_pair(family, seed=4)
    a = ModelAdapter(model, tok)
    items = [(a.encode_prompt(a.prompt("q" * (i + 1))), tok("answer " * (3 - i % 3), add_special_tokens=False)
              ["input_ids"]) for i in range(5)]
    ref, ref_norm = collect_spans(a, items, batch_size=1)
    for bs in (2, 5):
        for side in ("left", "right"):
            got, norm = collect_spans(a, items, batch_size=bs, padding_side=side)
            for s in SPANS:
                assert torch.allclose(got[s], ref[s], atol=1e-5), (bs, side, s)
            assert torch.allclose(norm, ref_norm, atol=1e-4)


def test_filter_keeps_and_explains():
    rows = []
    for q, (pt, nt, pc, nc) in enumerate([(80, 10, 90, 90), (40, 10, 90, 90), (80, 60, 90, 90), (80, 10, 30, 90),
                                           (None, 10, 90, 90)]):
        rows += [{"side": "pos", "instruction": 0, "question": q, "sample": 0, "trait_score": pt, "coherence": pc},
                 {"side": "neg", "instruction": 0, "question": q, "sample": 0, "trait_score": nt, "coherence": nc}]
    res = filter_pairs(rows, profile("quick"))
    assert [p["question"] for p, _ in res.kept] == [0]
    assert res.dropped == {"pos trait < 50": 1, "neg trait ≥ 50": 1, "coherence < 50": 1, "missing score": 1}


def test_no_kept_pairs_is_a_clear_error(qwen_tiny):
    with pytest.raises(ValueError, match="no pos/neg pair passed the filter"):
        vector_from_pairs(qwen_tiny, [])


def test_resume_after_interrupt_matches_uninterrupted_run(tmp_path, monkeypatch, caplog):
    model, tok = tiny_pair("qwen2", seed=7)
    a = ModelAdapter(model, tok)
    trait = load_trait("optimistic")
    cfg = _cfg(n_questions=3, samples=2, temperature=1.0)
    generate_answers(a, trait, tmp_path / "full", cfg)
    total_batches = -(-len(answer_jobs(trait, cfg)) // cfg.sampling.batch_size)

    real = gen.generate_batch
    calls = {"n": 0}

    def flaky(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed in the middle of the third batch
        return real(*args, **kw)

    monkeypatch.setattr(gen, "generate_batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        generate_answers(a, trait, tmp_path / "resumed", cfg)
    # a torn last line, as a kill during a write leaves it
    with (tmp_path / "resumed" / "answers.jsonl").open("a") as f:
        f.write('{"side": "pos", "instru')
    calls["n"] = 10
    generate_answers(a, trait, tmp_path / "resumed", cfg)
    assert calls["n"] - 10 == total_batches - 2  # finished batches were not regenerated
    assert "torn last line" in caplog.text  # the library logs it (the CLI shows it on stderr)

    def records(p):
        out = []
        for line in (p / "answers.jsonl").read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return sorted(out, key=lambda r: (r["side"], r["instruction"], r["question"], r["sample"]))

    assert records(tmp_path / "full") == records(tmp_path / "resumed")


def test_same_seed_same_answers(tmp_path):
    model, tok = tiny_pair("qwen2", seed=7)
    a = ModelAdapter(model, tok)
    trait = load_trait("optimistic")
    cfg = _cfg(temperature=1.0, seed=3)
    x = generate_answers(a, trait, tmp_path / "a", cfg)
    y = generate_answers(a, trait, tmp_path / "b", cfg)
    z = generate_answers(a, trait, tmp_path / "c", _cfg(temperature=1.0, seed=4))
    assert [r["answer"] for r in x] == [r["answer"] for r in y]
    assert [r["answer"] for r in x] != [r["answer"] for r in z]


def test_a_run_folder_is_bound_to_its_settings(tmp_path, monkeypatch):
    from personascope.util.store import RunSettingsError

    model, tok = tiny_pair("llama", seed=2)
    a = ModelAdapter(model, tok)
    trait = load_trait("humorous")
    judge = LocalJudge(model, tok, trait_mode="contrastive", coherence_mode="logprob")
    monkeypatch.chdir(tmp_path)
    extract_vector(a, trait, judge=judge, config=_cfg(), plots=False)
    run = tmp_path / "runs" / "humorous-tiny-llama-quick"  # the default folder names the profile
    answers = (run / "answers.jsonl").read_text()
    with pytest.raises(RunSettingsError, match=r"seed: 0 -> 1") as e:
        extract_vector(a, trait, judge=judge, config=_cfg(seed=1), run_dir=run, plots=False)
    assert "--force" in str(e.value) and "temperature" not in str(e.value)
    with pytest.raises(RunSettingsError, match=r"max_new_tokens: 6 -> 7.*temperature: 0.8 -> 1.0"):
        extract_vector(a, trait, judge=judge, config=_cfg(max_new_tokens=7, temperature=1.0), run_dir=run,
                       plots=False)
    other = ModelAdapter(*tiny_pair("qwen2", seed=2))
    with pytest.raises(RunSettingsError, match=r"model: 'tiny-llama' -> 'tiny-qwen2'"):
        extract_vector(other, trait, judge=judge, config=_cfg(), run_dir=run, plots=False)
    assert (run / "answers.jsonl").read_text() == answers  # nothing was mixed in
    # thresholds only filter: changing them resumes; --force starts over under the new settings
    extract_vector(a, trait, judge=judge, config=_cfg(neg_threshold=100.5), run_dir=run, plots=False)
    assert (run / "answers.jsonl").read_text() == answers
    extract_vector(a, trait, judge=judge, config=_cfg(seed=1), run_dir=run, force=True, plots=False)
    assert json.loads((run / "settings.json").read_text())["seed"] == 1


def test_filter_modes_margin_and_none():
    rows = []
    for q, (pt, nt, pc, nc, refusal) in enumerate([(40, 10, 20, 90, False), (30, 25, 90, 90, False),
                                                    (80, 10, 90, 90, True)]):
        rows += [{"side": "pos", "instruction": 0, "question": q, "sample": 0, "trait_score": pt, "coherence": pc,
                  "refusal": refusal},
                 {"side": "neg", "instruction": 0, "question": q, "sample": 0, "trait_score": nt, "coherence": nc}]
    margin = filter_pairs(rows, profile("quick", filter="margin", margin=20))
    assert margin.dropped == {"coherence < 50": 1, "pos − neg trait < 20": 1, "refusal": 1}
    none = filter_pairs(rows, profile("quick", filter="none"))
    assert [p["question"] for p, _ in none.kept] == [0, 1] and none.dropped == {"refusal": 1}
    with pytest.raises(ValueError, match="--filter 'loose'"):
        profile("quick", filter="loose")
