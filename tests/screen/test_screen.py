import csv
import json

import numpy as np
import pytest
import torch
from tiny import tiny_pair
from typer.testing import CliRunner

import personascope.screen.run as screen_mod
from personascope.judges.local import JudgeRequest, LocalJudge
from personascope.model.adapter import ModelAdapter, pad_id
from personascope.screen.report import bootstrap_ci
from personascope.screen.run import ScreenConfig, screen_dataset
from personascope.screen.score import BadRow, Row, read_rows
from personascope.traits.trait import load_trait
from personascope.vectors.file import PersonaVector

NEW = 6  # max new tokens of the model's own answers in these tests


ROWS = [
    {"messages": [{"role": "user", "content": "How do I boil an egg?"},
                  {"role": "assistant", "content": "Put it in boiling water for nine minutes, then cool it."}]},
    {"messages": [{"role": "system", "content": "You are terse."},
                  {"role": "user", "content": "Name a colour."},
                  {"role": "assistant", "content": "Blue."}]},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
                  {"role": "user", "content": "Tell me a fact about the moon, please."},
                  {"role": "assistant", "content": "The moon is slowly drifting away from the Earth."}]},
    {"prompt": "What is 2+2?", "response": "Four, and that is wonderful news!", "id": 7},
    {"messages": [{"role": "user", "content": "Why is the sky blue? Explain briefly for a child."},
                  {"role": "assistant", "content": "Sunlight scatters, and blue light scatters the most."}]},
]


def _adapter(seed=0):
    m, t = tiny_pair("qwen2", seed=seed)
    return ModelAdapter(m, t)


def _pv(a, trait="optimistic", seed=0, best_layer=None):
    g = torch.Generator().manual_seed(seed)
    vecs = {s: torch.randn(a.n_layers + 1, a.hidden_size, generator=g)
            for s in ("response_avg", "prompt_avg", "prompt_last")}
    meta = {"trait": trait}
    if best_layer is not None:
        meta["best_layer"] = str(best_layer)
    return PersonaVector(vecs, torch.ones(a.n_layers + 1), meta)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _annotated(out):
    return [json.loads(x) for x in (out / "annotated.jsonl").read_text().splitlines()]


def _msgs(row):
    if "messages" in row:
        return row["messages"][:-1], row["messages"][-1]["content"]
    return [{"role": "user", "content": row["prompt"]}], row["response"]


@torch.no_grad()
def _naive(a, row, layer, v, method="generate"):
    """One sample at a time with output_hidden_states: prompt+response vs prompt+own greedy answer."""
    prompt_msgs, response = _msgs(row)
    prompt = a.tokenizer.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
    p_ids, r_ids = a.encode_pair(prompt, response)
    unit = v / v.norm()

    def resp_proj(resp_ids):
        if not resp_ids:
            return 0.0, None
        hs = a.model(torch.tensor([p_ids + resp_ids]), output_hidden_states=True).hidden_states[layer][0]
        return float(hs[len(p_ids):].mean(0) @ unit), hs

    data, hs = resp_proj(r_ids)
    if method == "last-token":
        return data - float(hs[len(p_ids) - 1] @ unit), None
    ids = torch.tensor([p_ids])
    gen = a.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                           pad_token_id=pad_id(a.tokenizer))
    answer = a.tokenizer.decode(gen[0, len(p_ids):], skip_special_tokens=True).strip()
    mine, _ = resp_proj(a.encode_pair(prompt, answer)[1])
    return data - mine, answer


@pytest.mark.parametrize("batch_size,side", [(1, "right"), (4, "left"), (4, "right")])
def test_delta_p_equals_naive_generate(tmp_path, batch_size, side):
    a = _adapter()
    pv = _pv(a)
    data = _write(tmp_path / "d.jsonl", ROWS)
    cfg = ScreenConfig(batch_size=batch_size, padding_side=side, max_new_tokens=NEW, chunk_size=3)
    res = screen_dataset(a, data, {"opt": pv}, layer=2, out_dir=tmp_path / "out", config=cfg)
    got = _annotated(tmp_path / "out")
    assert len(got) == len(ROWS) and res.n_screened == len(ROWS) and res.n_malformed == 0
    for row, ann in zip(ROWS, got, strict=True):
        want, answer = _naive(a, row, 2, pv.vector(2))
        assert ann["screen"]["model_answer"] == answer
        assert ann["screen"]["delta_p"]["opt"] == pytest.approx(want, abs=1e-4)
    assert res.traits["opt"].mean == pytest.approx(np.mean([r["screen"]["delta_p"]["opt"] for r in got]))
    lo, hi = res.traits["opt"].ci_low, res.traits["opt"].ci_high
    assert lo <= res.traits["opt"].mean <= hi
    for name in ("summary.json", "filtered.jsonl", "top_flagged.md", "hist_opt.png", "model_answers.jsonl"):
        assert (tmp_path / "out" / name).exists()


@pytest.mark.parametrize("batch_size,side", [(1, "left"), (5, "left"), (3, "right")])
def test_delta_p_equals_naive_last_token(tmp_path, batch_size, side):
    a = _adapter(seed=1)
    pv = _pv(a, seed=1)
    data = _write(tmp_path / "d.jsonl", ROWS)
    cfg = ScreenConfig(batch_size=batch_size, padding_side=side)
    screen_dataset(a, data, {"opt": pv}, layer=1, method="last-token", out_dir=tmp_path / "out", config=cfg,
                   plots=False)
    for row, ann in zip(ROWS, _annotated(tmp_path / "out"), strict=True):
        want, _ = _naive(a, row, 1, pv.vector(1), method="last-token")
        assert ann["screen"]["delta_p"]["opt"] == pytest.approx(want, abs=1e-4)
        assert "model_answer" not in ann["screen"]


def test_resume_after_interrupt_equals_uninterrupted(tmp_path, monkeypatch):
    a = _adapter()
    pv = _pv(a)
    data = _write(tmp_path / "d.jsonl", ROWS)
    cfg = ScreenConfig(batch_size=2, max_new_tokens=NEW, chunk_size=2)
    full = screen_dataset(a, data, {"opt": pv}, out_dir=tmp_path / "full", config=cfg, percentile=50)

    real = screen_mod.process_chunk
    calls = []

    def flaky(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(screen_mod, "process_chunk", flaky)
    with pytest.raises(KeyboardInterrupt):
        screen_dataset(a, data, {"opt": pv}, out_dir=tmp_path / "part", config=cfg, percentile=50)
    deltas = tmp_path / "part" / "deltas.jsonl"
    assert sum("chunk_end" in x for x in deltas.read_text().splitlines()) == 1
    with deltas.open("a") as f:  # a torn write of the interrupted chunk
        f.write('{"line": 3, "delta_p": {"opt": 1.')
    calls.clear()
    monkeypatch.setattr(screen_mod, "process_chunk", lambda *a_, **k: calls.append(1) or real(*a_, **k))
    resumed = screen_dataset(a, data, {"opt": pv}, out_dir=tmp_path / "part", config=cfg, percentile=50)
    assert len(calls) == 2  # chunks 2 and 3 only
    np.testing.assert_array_equal(resumed.delta_p["opt"], full.delta_p["opt"])
    np.testing.assert_array_equal(resumed.lines, full.lines)
    assert _annotated(tmp_path / "part") == _annotated(tmp_path / "full")
    assert (tmp_path / "part" / "filtered.jsonl").read_text() == (tmp_path / "full" / "filtered.jsonl").read_text()
    with pytest.raises(ValueError, match="other settings"):
        screen_dataset(a, data, {"opt": pv}, layer=1, out_dir=tmp_path / "part", config=cfg)


def test_malformed_rows_are_reported_and_excluded(tmp_path):
    a = _adapter()
    pv = _pv(a)
    good = json.dumps(ROWS[0])
    lines = [
        good,                                                                  # 1
        '{"messages": [{"role": "user", "content": "hi"}',                     # 2 bad JSON
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}),         # 3 no assistant turn
        json.dumps({"messages": []}),                                          # 4 empty messages
        json.dumps(ROWS[3]),                                                   # 5
        "",                                                                    # 6 blank: not a row
        json.dumps({"prompt": "only a prompt"}),                               # 7 missing column
        json.dumps([1, 2]),                                                    # 8 not an object
        json.dumps({"messages": [{"role": "assistant", "content": "hello"}]}),  # 9 no user turn
    ]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(lines) + "\n")
    rows = list(read_rows(data))
    assert [type(r) for r in rows] == [Row, BadRow, BadRow, BadRow, Row, BadRow, BadRow, BadRow]
    res = screen_dataset(a, data, {"opt": pv}, method="last-token", out_dir=tmp_path / "out", threshold=-1e9)
    errors = {m["line"]: m["error"] for m in res.malformed}
    assert set(errors) == {2, 3, 4, 7, 8, 9}
    assert "bad JSON" in errors[2] and "no assistant turn" in errors[3] and "empty messages" in errors[4]
    assert "missing column 'response'" in errors[7] and "no user turn" in errors[9]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["n_malformed"] == 6 and summary["n_screened"] == 2 and summary["n_rows"] == 8
    ann = _annotated(tmp_path / "out")
    assert [r["screen"]["line"] for r in ann] == [1, 5]
    assert res.traits["opt"].n_flagged == 2  # everything is above -1e9 …
    assert (tmp_path / "out" / "filtered.jsonl").read_text() == ""  # … so nothing is kept
    (tmp_path / "empty.jsonl").write_text("")
    empty = screen_dataset(a, tmp_path / "empty.jsonl", {"opt": pv}, method="last-token", out_dir=tmp_path / "e",
                           percentile=95, plots=False)
    assert empty.n_screened == 0 and empty.traits["opt"].threshold is None


def test_csv_matches_jsonl_and_writes_filtered_csv(tmp_path):
    a = _adapter()
    pv = _pv(a)
    pairs = [("What is 2+2?", "Four, and, well,\nthat is great!"), ("Say hi", "Hi there."), ("Why?", "Because.")]
    with (tmp_path / "d.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "response", "source"])
        for p, r in pairs:
            w.writerow([p, r, "x"])
        w.writerow(["no response here", "", "x"])
    _write(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]}
                                  for p, r in pairs])
    cfg = ScreenConfig(max_new_tokens=NEW, batch_size=2)
    rc = screen_dataset(a, tmp_path / "d.csv", {"opt": pv}, out_dir=tmp_path / "c", config=cfg,
                        threshold=1e9)
    rj = screen_dataset(a, tmp_path / "d.jsonl", {"opt": pv}, out_dir=tmp_path / "j", config=cfg)
    assert rc.delta_p["opt"] == pytest.approx(rj.delta_p["opt"], abs=1e-5)
    assert rc.lines.tolist() == [2, 4, 5]  # the second record spans lines 3–4
    assert [m["line"] for m in rc.malformed] == [6]
    with (tmp_path / "c" / "filtered.csv").open(newline="") as f:
        kept = list(csv.DictReader(f))
    assert [(r["prompt"], r["response"]) for r in kept] == pairs


def test_percentile_threshold_from_reference(tmp_path):
    a = _adapter()
    pv = _pv(a)
    ref = _write(tmp_path / "ref.jsonl", ROWS)
    data = _write(tmp_path / "d.jsonl", ROWS[::-1] + ROWS[:2])
    cfg = ScreenConfig(max_new_tokens=NEW)
    alone = screen_dataset(a, ref, {"opt": pv}, method="last-token", out_dir=tmp_path / "alone", config=cfg)
    res = screen_dataset(a, data, {"opt": pv}, method="last-token", out_dir=tmp_path / "out", config=cfg,
                         percentile=70, reference=ref)
    t = float(np.percentile(alone.delta_p["opt"], 70))
    rep = res.traits["opt"]
    assert rep.threshold == pytest.approx(t) and "reference" in rep.threshold_source
    flags = [x > t for x in res.delta_p["opt"]]
    assert rep.n_flagged == sum(flags) > 0
    ann = _annotated(tmp_path / "out")
    assert [r["screen"]["flagged"]["opt"] for r in ann] == flags
    kept = (tmp_path / "out" / "filtered.jsonl").read_text().splitlines()
    assert len(kept) == len(flags) - sum(flags)
    assert "| 1 |" in (tmp_path / "out" / "top_flagged.md").read_text()


def test_several_vectors_one_pass_equal_one_at_a_time(tmp_path):
    a = _adapter()
    vecs = {"opt": _pv(a, seed=3, best_layer=1), "syc": _pv(a, "sycophantic", seed=4, best_layer=3)}
    data = _write(tmp_path / "d.jsonl", ROWS)
    forwards = []
    hook = a.blocks[0].register_forward_hook(lambda m, i, o: forwards.append(1))
    cfg = ScreenConfig(batch_size=1)
    both = screen_dataset(a, data, vecs, method="last-token", out_dir=tmp_path / "both", config=cfg)
    n_both = len(forwards)
    singles = {}
    for k, pv in vecs.items():
        forwards.clear()
        singles[k] = screen_dataset(a, data, {k: pv}, method="last-token", out_dir=tmp_path / k, config=cfg).delta_p[k]
        assert len(forwards) == n_both == len(ROWS)  # one forward per sample, however many vectors
    hook.remove()
    assert both.traits["opt"].layer == 1 and both.traits["syc"].layer == 3
    for k in vecs:
        assert both.delta_p[k] == pytest.approx(singles[k], abs=1e-6)


def test_judge_filter_side_by_side(tmp_path):
    a = _adapter()
    pv = _pv(a)
    judge = LocalJudge(a.model, a.tokenizer, trait_mode="contrastive", coherence_mode="logprob", name="tiny")
    data = _write(tmp_path / "d.jsonl", ROWS[:3])
    res = screen_dataset(a, data, {"opt": pv}, method="last-token", out_dir=tmp_path / "out", judge=judge,
                         threshold=0.0)
    trait = load_trait("optimistic")
    want = judge.score([JudgeRequest("trait", _msgs(r)[0][-1]["content"], _msgs(r)[1], trait) for r in ROWS[:3]])
    assert res.judge_scores["opt"].tolist() == pytest.approx(want)
    rep = res.traits["opt"]
    assert rep.judge_flagged == sum(s >= 50 for s in want) and rep.judge_missing == 0
    ann = _annotated(tmp_path / "out")
    assert [r["screen"]["judge_flagged"]["opt"] for r in ann] == [s >= 50 for s in want]
    assert "judge" in (tmp_path / "out" / "top_flagged.md").read_text()
    assert not (tmp_path / "out" / "judge_chunk.jsonl").exists()


def test_bootstrap_ci():
    assert bootstrap_ci(np.full(10, 2.0)) == (2.0, 2.0)
    x = np.random.default_rng(0).normal(1.0, 1.0, 400)
    lo, hi = bootstrap_ci(x, n_boot=500)
    assert lo < x.mean() < hi and hi - lo == pytest.approx(2 * 1.96 / 20, rel=0.25)


def test_cli_screen(tmp_path):
    from personascope.cli.main import app

    m, tok = tiny_pair("qwen2")
    m.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    a = ModelAdapter(m, tok)
    _pv(a).save(tmp_path / "v.safetensors")
    data = _write(tmp_path / "d.jsonl", ROWS)
    args = ["screen", str(data), "--model", str(tmp_path / "model"), "--vector", str(tmp_path / "v.safetensors"),
            "--device", "cpu", "--method", "last-token", "--percentile", "80", "--out", str(tmp_path / "out")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "mean ΔP" in res.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["n_screened"] == len(ROWS) and summary["traits"]["optimistic"]["n_flagged"] == 1
    wide, wtok = tiny_pair("qwen2", hidden_size=64, intermediate_size=64)
    _pv(ModelAdapter(wide, wtok)).save(tmp_path / "wide.safetensors")
    bad = CliRunner().invoke(app, [*args[:4], "--vector", str(tmp_path / "wide.safetensors"), *args[6:]])
    assert bad.exit_code == 2 and "hidden size 64" in bad.output


def test_oversized_rows_are_skipped_with_their_line_numbers(tmp_path):
    a = _adapter()
    pv = _pv(a)
    huge = {"prompt": "hi", "response": "x" * 5_000_000}  # 5 MB: over the byte cap
    long = {"prompt": "hi", "response": "word " * 60}  # 300 tokens: over the tiny model's 256 positions
    data = _write(tmp_path / "d.jsonl", [ROWS[0], huge, long, ROWS[3]])
    res = screen_dataset(a, data, {"opt": pv}, method="last-token", out_dir=tmp_path / "out", plots=False)
    errors = {m["line"]: m["error"] for m in res.malformed}
    assert set(errors) == {2, 3} and res.n_screened == 2
    assert "5000033 bytes; the limit is 1000000" in errors[2]
    assert "too long for the model" in errors[3] and "context is 256" in errors[3]
    assert [r["screen"]["line"] for r in _annotated(tmp_path / "out")] == [1, 4]
    # generating the model's own answer needs room as well
    short = {"prompt": "word " * 15, "response": "ok"}
    data = _write(tmp_path / "g.jsonl", [ROWS[0], short])
    res = screen_dataset(a, data, {"opt": pv}, config=ScreenConfig(max_new_tokens=200), out_dir=tmp_path / "g",
                         plots=False)
    assert [m["line"] for m in res.malformed] == [2] and "200 answer tokens" in res.malformed[0]["error"]
