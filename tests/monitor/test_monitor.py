import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import tiny_pair

from personascope.judges.local import LocalJudge
from personascope.model.adapter import ModelAdapter
from personascope.monitor.run import MonitorConfig, load_shot_pool, run_monitor
from personascope.monitor.trace import pearson_r, project_prompts, trace_answers, trace_generation
from personascope.traits.trait import load_trait
from personascope.vectors.file import PersonaVector, base_metadata

QUESTIONS = ["hello there, how are you today?", "hi", "what is two plus two", "tell me a story about a dragon"]



def _setup(family: str = "qwen2", seed: int = 3):
    model, tok = tiny_pair(family, seed=seed)
    a = ModelAdapter(model, tok)
    g = torch.Generator().manual_seed(1)
    pv = PersonaVector({"response_avg": torch.randn(a.n_layers + 1, a.hidden_size, generator=g)},
                       torch.ones(a.n_layers + 1), base_metadata(a, "optimistic"))
    return a, pv


def _all_hidden(a: ModelAdapter, ids: list[int]) -> list[torch.Tensor]:
    """Residual stream [T, d] at every layer 0..L of one unpadded sequence, from output_hidden_states.

    Hugging Face applies the final norm to hidden_states[L], whereas layer L means the output of the
    last block, so that one is read from the block's output directly.
    """
    grabbed = []
    hook = a.blocks[-1].register_forward_hook(lambda m, i, o: grabbed.append(o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            hs = a.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    finally:
        hook.remove()
    return [h[0] for h in hs[:-1]] + [grabbed[0][0]]


def _hidden(a: ModelAdapter, ids: list[int], layer: int) -> torch.Tensor:
    return _all_hidden(a, ids)[layer]


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
@pytest.mark.parametrize("batch_size", [1, 5])
def test_projections_match_naive_hidden_states(family, batch_size):
    a, pv = _setup(family)
    systems = [None, "You are a cheerful assistant.", "Be brief."]
    prompts = [(s, q) for s in systems for q in QUESTIONS]  # different lengths -> padding in a batch
    table = project_prompts(a, prompts, pv, [0, 1, a.n_layers], batch_size=batch_size)
    assert table.layers == [0, 1, a.n_layers] and len(table.values) == len(prompts)
    for i, (s, q) in enumerate(prompts):
        hs = _all_hidden(a, a.encode_prompt(a.prompt(q, s)))
        for layer in table.layers:
            v = pv.vector(layer)
            assert table.column(layer)[i] == pytest.approx(float(hs[layer][-1] @ (v / v.norm())), abs=1e-4)
    # rendered prompt strings give the same numbers; a raw [d] vector works for one layer
    top = a.n_layers
    again = project_prompts(a, [a.prompt(q, s) for s, q in prompts], pv.vector(top), top, batch_size=batch_size)
    assert again.column() == pytest.approx(table.column(top), abs=1e-5)
    assert table.rows[0]["prompt"] == a.prompt(QUESTIONS[0])


def test_projection_of_response_span():
    a, pv = _setup()
    prompts = [(None, q) for q in QUESTIONS[:2]]
    answers = ["I am fine.", "Hello to you too, friend!"]
    table = project_prompts(a, prompts, pv, 2, span="response_avg", answers=answers)
    for i, ((s, q), ans) in enumerate(zip(prompts, answers, strict=True)):
        p_ids, r_ids = a.encode_pair(a.prompt(q, s), ans)
        v = pv.vector(2)
        want = float(_hidden(a, p_ids + r_ids, 2)[len(p_ids):].mean(0) @ (v / v.norm()))
        assert table.values[i][0] == pytest.approx(want, abs=1e-4)


def _teacher_forced(a: ModelAdapter, prompt: str, answer_ids: list[int], v: torch.Tensor, layer: int):
    p_ids = a.encode_prompt(prompt)
    proj = _hidden(a, p_ids + answer_ids, layer) @ (v / v.norm())
    return float(proj[len(p_ids) - 1]), proj[len(p_ids):].tolist()


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_live_trace_equals_teacher_forced_projections(family):
    a, pv = _setup(family, seed=5)
    prompts = [a.prompt(q) for q in QUESTIONS]  # different prompt lengths -> left padding
    layers = [0, 2, a.n_layers]
    traces = trace_generation(a, prompts, pv, layers, max_new_tokens=12, temperature=0.0)
    assert len(traces) == len(prompts)
    assert any(len(t.token_ids) >= 8 for t in traces)
    for tr, prompt in zip(traces, prompts, strict=True):
        assert len(tr.tokens) == len(tr.token_ids) == len(tr.at(2))
        assert "".join(tr.tokens) == a.tokenizer.decode(tr.token_ids)
        n_p = len(a.encode_prompt(prompt))
        hs = _all_hidden(a, a.encode_prompt(prompt) + tr.token_ids)
        for layer in layers:
            v = pv.vector(layer)
            proj = hs[layer] @ (v / v.norm())
            assert tr.prompt_value[layer] == pytest.approx(float(proj[n_p - 1]), abs=1e-4)
            assert tr.values[layer] == pytest.approx(proj[n_p:].tolist(), abs=1e-4)
    # the teacher-forced helper agrees, and so do the prompt projections
    forced = trace_answers(a, prompts, [t.token_ids for t in traces], pv, layers, batch_size=3)
    for tr, fo in zip(traces, forced, strict=True):
        assert fo.values[2] == pytest.approx(tr.values[2], abs=1e-4)
    table = project_prompts(a, prompts, pv, 2)
    assert table.column() == pytest.approx([t.prompt_value[2] for t in traces], abs=1e-4)


def test_sampled_trace_batched_equals_teacher_forced():
    a, pv = _setup(seed=7)
    prompts = [(None, q) for q in QUESTIONS[:3]]
    traces = trace_generation(a, prompts, pv, 1, max_new_tokens=10, temperature=1.0, seed=0)
    for tr, (s, q) in zip(traces, prompts, strict=True):
        _, want = _teacher_forced(a, a.prompt(q, s), tr.token_ids, pv.vector(1), 1)
        assert tr.at() == pytest.approx(want, abs=1e-4)


def test_pearson_r_known_values():
    assert pearson_r([1, 2, 3, 4, 5], [2, 4, 6, 8, 10]) == pytest.approx(1.0)
    assert pearson_r([1, 2, 3, 4, 5], [5, 4, 3, 2, 1]) == pytest.approx(-1.0)
    # textbook example: r = 0.7746
    assert pearson_r([1, 2, 3, 4, 5], [2, 4, 5, 4, 5]) == pytest.approx(0.774597, abs=1e-6)
    # missing values are dropped pairwise; too few points or no variance give None
    assert pearson_r([1, None, 3, 4, 5, 2], [2, 7, 5, 4, 5, 4]) == pytest.approx(0.774597, abs=1e-6)
    assert pearson_r([1, 2], [3, 4]) is None
    assert pearson_r([1, 1, 1], [1, 2, 3]) is None
    xs = torch.randn(200, generator=torch.Generator().manual_seed(0))
    ys = 0.5 * xs + torch.randn(200, generator=torch.Generator().manual_seed(1))
    assert pearson_r(xs.tolist(), ys.tolist()) == pytest.approx(float(torch.corrcoef(torch.stack([xs, ys]))[0, 1]),
                                                                abs=1e-6)


def test_condition_means_r_and_its_bootstrap_interval():
    from personascope.monitor.run import analyse, condition_means_r, drop_refusals

    # 4 conditions x 6 questions; projection and trait both rise with the condition, plus per-question noise
    recs = [{"experiment": "system", "condition": c, "label": str(c), "system": None, "n_shots": 0, "question": q,
             "prompt_projection": [0.0, c + 0.3 * ((q * 7) % 5)], "trait_score": 20.0 * c + 5.0 * ((q * 3) % 4),
             "coherence": 80.0} for c in range(4) for q in range(6)]
    means = [(sum(r["prompt_projection"][1] for r in recs if r["condition"] == c) / 6,
              sum(r["trait_score"] for r in recs if r["condition"] == c) / 6) for c in range(4)]
    want = pearson_r([m[0] for m in means], [m[1] for m in means])
    assert condition_means_r(recs, range(6), 1) == pytest.approx(want)
    # repeating a question weighs it twice
    twice = condition_means_r(recs, [0, 0, 1], 1)
    sub = [r for r in recs if r["question"] in (0, 1)] + [r for r in recs if r["question"] == 0]
    m2 = [(sum(r["prompt_projection"][1] for r in sub if r["condition"] == c),
           sum(r["trait_score"] for r in sub if r["condition"] == c)) for c in range(4)]
    assert twice == pytest.approx(pearson_r([m[0] for m in m2], [m[1] for m in m2]))
    res = analyse(recs, "system", 1, 1)
    assert res["n_refusals"] == 0 and res["n_scored"] == 24
    refused = drop_refusals([{**recs[0], "refusal": True}] + recs[1:])
    assert refused[0]["trait_score"] is None and refused[0]["refused_score"] == recs[0]["trait_score"]
    assert refused[1:] == recs[1:]
    res_r = analyse(refused, "system", 1, 1)
    assert res_r["n_refusals"] == 1 and res_r["n_scored"] == 23
    lo, hi = res["r_condition_means_ci"]
    assert lo <= res["r_condition_means"] <= hi and hi - lo < 0.2
    lo, hi = res["r_ci"]
    assert lo <= res["r"] <= hi < 1.0


def _extraction_run(run_dir: Path, trait) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    answers, scores = [], []
    for i, q in enumerate(trait.extract_questions[:8]):
        for side in ("pos", "neg"):
            ans = f"{side} answer {i}: things will be {'great' if side == 'pos' else 'bad'}"
            answers.append({"side": side, "instruction": 0, "question": i, "sample": 0, "question_text": q,
                            "system": "s", "answer": ans})
            scores.append({"kind": "trait", "question": q, "answer": ans, "score": 10.0 * i})
    (run_dir / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in answers))
    (run_dir / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in scores))


def test_shot_pool_prefers_high_scores_and_skips_eval_questions(tmp_path):
    trait = load_trait("optimistic")
    _extraction_run(tmp_path, trait)
    pool = load_shot_pool(tmp_path / "answers.jsonl", tmp_path / "scores.jsonl",
                          exclude=[trait.extract_questions[7]])
    assert [q for q, _ in pool] == [trait.extract_questions[i] for i in range(6, -1, -1)]
    assert all(a.startswith("pos") for _, a in pool)
    assert not set(q for q, _ in pool) & set(trait.eval_questions)


def test_run_monitor_end_to_end_and_resumes(tmp_path):
    a, pv = _setup(seed=11)
    trait = load_trait("optimistic")
    _extraction_run(tmp_path / "extract", trait)
    pv.save(tmp_path / "extract" / "vector.safetensors")
    judge = LocalJudge(a.model, a.tokenizer, trait_mode="contrastive", coherence_mode="logprob")
    cfg = MonitorConfig(n_questions=2, max_new_tokens=6, temperature=0.0, shots=(0, 2, 4), examples=2)
    ladder = ["Be gloomy.", "Be neutral.", "Be cheerful."]
    out = tmp_path / "monitor"
    res = run_monitor(a, trait, judge, pv, out, cfg, layer=2, ladder=ladder, screenshot=False)
    assert set(res.experiments) == {"system", "shots"}
    assert res.experiments["system"]["n"] == 6 and res.experiments["shots"]["n"] == 6
    assert [c["condition"] for c in res.experiments["shots"]["conditions"]] == [0, 2, 4]
    assert len(res.experiments["system"]["r_by_layer"]) == a.n_layers + 1
    summary = json.loads((out / "monitor.json").read_text())
    assert summary["layer"] == 2 and summary["experiments"]["system"]["paper_r"] is None
    for key in ("scatter", "r_by_layer", "heatmap", "report"):
        assert Path(summary["files"][key]).stat().st_size > 500
    recs = [json.loads(x) for x in (out / "answers.jsonl").read_text().splitlines()]
    assert len(recs) == 12
    # the stored projection is the last-prompt-token projection, as project_prompts computes it
    for r in recs[:3]:
        assert r["projection"] == pytest.approx(project_prompts(a, [r["prompt"]], pv, 2).values[0][0], abs=1e-4)
        assert len(r["trace"]) == len(r["tokens"])
    shots4 = next(r for r in recs if r["experiment"] == "shots" and r["condition"] == 4)
    assert shots4["prompt"].count("pos answer") == 4
    lines = (out / "answers.jsonl").read_text()
    again = run_monitor(a, trait, judge, pv, out, cfg, layer=2, ladder=ladder, screenshot=False)
    assert (out / "answers.jsonl").read_text() == lines
    assert again.experiments["system"]["r"] == res.experiments["system"]["r"]
    from dataclasses import replace

    from personascope.util.store import RunSettingsError

    with pytest.raises(RunSettingsError, match="max_new_tokens: 6 -> 7"):
        run_monitor(a, trait, judge, pv, out, replace(cfg, max_new_tokens=7), layer=2, ladder=ladder,
                    screenshot=False)
    assert (out / "answers.jsonl").read_text() == lines


def test_watch_with_piped_stdin_prints_meter_and_exits(tmp_path):
    a, pv = _setup(seed=2)
    model_dir = tmp_path / "tiny-model"
    a.model.save_pretrained(model_dir)
    a.tokenizer.save_pretrained(model_dir)
    pv.save(tmp_path / "v.safetensors")
    html = tmp_path / "session.html"
    env = {**os.environ, "COLUMNS": "100", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "personascope.cli", "watch", "--model", str(model_dir), "--vector",
         str(tmp_path / "v.safetensors"), "--layer", "2", "--threshold", "-1000", "--max-new-tokens", "6",
         "--temperature", "0", "--device", "cpu", "--save-html", str(html)],
        input="hello there\nhow are you?\n/quit\nnever read\n", capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    out = proc.stdout
    assert out.count("trait meter") == 2 and "never read" not in out
    assert "crossed threshold" in out
    assert html.exists() and "hello there" in html.read_text()
    # end of input without /quit ends too (in-process: the CLI runner pipes a non-TTY stdin)
    from typer.testing import CliRunner

    from personascope.cli.main import app

    res = CliRunner().invoke(app, ["watch", "--model", str(model_dir), "--vector", str(tmp_path / "v.safetensors"),
                                   "--max-new-tokens", "3", "--device", "cpu"], input="one line only\n")
    assert res.exit_code == 0, res.output
    assert res.output.count("trait meter") == 1 and "you › one line only" in res.output


def test_watch_marks_the_tokens_the_guard_touched(tmp_path):
    from rich.console import Console

    from personascope.cli.watch import run_watch
    from personascope.model.adapter import pad_id
    from personascope.steering.guard import Guard

    a, pv = _setup(seed=2)
    v = pv.vector(2)
    seen = trace_generation(a, [a.prompt("hello there")], pv, 2, 8)[0].at()
    hi = sorted(seen)[len(seen) // 2]  # the guard acts on some tokens, not all
    console = Console(record=True, width=120)
    turns = run_watch(a, pv, 2, ["hello there", "/quit"], console, max_new_tokens=8, temperature=0.0,
                      history=False, guard=Guard(a).cap(v, 2, hi=hi), html_path=tmp_path / "s.html")
    out = console.export_text()
    flags = turns[0].guarded
    assert len(flags) == len(turns[0].trace.tokens) and sum(flags) > 0
    assert f"guard acted on {sum(flags)} of {len(flags)} tokens" in out
    assert f"(acts above {hi:+.2f})" in out.replace("\n", ""), out
    # the same flags as the guard on a plain greedy generate of the same prompt
    ids = torch.tensor([a.encode_prompt(a.prompt("hello there"))])
    offline = Guard(a).cap(v, 2, hi=hi)
    with torch.no_grad(), offline:
        a.model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=pad_id(a.tokenizer))
    assert flags == offline.last.fired[0][: len(flags)]
    assert f"guard acted on {sum(flags)} tokens" in (tmp_path / "s.html").read_text()
