import pytest
import torch
from tiny import tiny_pair

from personascope.model.adapter import (
    ModelAdapter,
    block_output,
    cache_kwarg,
    output_cache,
    pad_batch,
    pad_id,
    position_ids_for,
    with_block_output,
)
from personascope.steering.guard import Guard

N_NEW = 6


def _batch(a: ModelAdapter):
    prompts = [a.prompt("hello there, how are you today?"), a.prompt("hi"), a.prompt("what is two plus two")]
    return pad_batch([a.encode_prompt(p) for p in prompts], pad_id(a.tokenizer), "left")


def _generate(a, ids, mask, n=N_NEW):
    out = a.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=pad_id(a.tokenizer), output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, 1)  # [B, n, V]


def _hook(a, layer, fn):
    def post(m, i, o):
        new = fn(block_output(o))
        return None if new is None else with_block_output(o, new)

    return a.blocks[layer - 1].register_forward_hook(post)


def _reference(a, seqs, mask0, op, positions, n=N_NEW):
    """No cache: a full forward per step; `op(layer, h, where)` edits positions by hand and returns the fire mask.

    Returns logits [B, n, V] and, per step, which rows the guard acted on at the positions new in that step.
    """
    t0 = mask0.shape[1]
    logits, fired = [], []
    for k in range(n):
        ids = seqs[:, : t0 + k]
        mask = torch.cat([mask0, torch.ones(len(seqs), k, dtype=torch.long)], 1)
        where = mask.bool() & (torch.arange(t0 + k) >= t0 - 1 if positions == "response" else True)
        new = torch.zeros_like(where)
        new[:, (0 if k == 0 else t0 + k - 1):] = True
        acted = torch.zeros_like(where)
        handles = op(a, where, acted)
        try:
            out = a.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_for(mask), use_cache=False)
        finally:
            for hd in handles:
                hd.remove()
        logits.append(out.logits[:, -1])
        fired.append((acted & new).any(1).tolist())
    return torch.stack(logits, 1), [list(r) for r in zip(*fired, strict=True)]


def _cap_ref(v, layer, lo, hi):
    u = v / v.norm()

    def op(a, where, acted):
        def fn(h):
            p = h @ u
            target = p.clamp(lo, hi)
            act = (target != p) & where
            acted.logical_or_(act)
            return h + torch.where(act, target - p, 0.0).unsqueeze(-1) * u

        return [_hook(a, layer, fn)]

    return op


def _cond_ref(c, cond_layer, thr, v, layer, coef):
    cu = c / c.norm()
    state = {}

    def op(a, where, acted):
        def read(h):
            state["fire"] = (h @ cu > thr) & where
            return None

        def steer(h):
            fire = state["fire"]
            acted.logical_or_(fire)
            return h + coef * fire.unsqueeze(-1).float() * v

        if cond_layer == layer:
            return [_hook(a, layer, lambda h: (read(h), steer(h))[1])]
        return [_hook(a, cond_layer, read), _hook(a, layer, steer)]

    return op


def _projections(a, ids, mask, v, layer):
    """Unguarded projections on v̂ at every position (to pick thresholds inside the observed range)."""
    seen = {}
    hd = _hook(a, layer, lambda h: seen.setdefault("h", h))
    with torch.no_grad():
        a.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_for(mask))
    hd.remove()
    return (seen["h"] @ (v / v.norm()))[mask.bool()]


@pytest.mark.parametrize("positions", ["response", "all"])
@pytest.mark.parametrize("family", ["qwen2", "llama", "gpt2"])
def test_cap_matches_uncached_reference(family, positions):
    model, tok = tiny_pair(family)
    a = ModelAdapter(model, tok)
    ids, mask = _batch(a)
    g = torch.Generator().manual_seed(1)
    v = torch.randn(a.hidden_size, generator=g)
    layer = 2
    seqs0, _ = _generate(a, ids, mask)
    p = _projections(a, seqs0, torch.cat([mask, torch.ones(3, N_NEW, dtype=torch.long)], 1), v, layer)
    lo, hi = float(p.quantile(0.2)), float(p.quantile(0.6))  # many positions outside, some inside
    guard = Guard(a).cap(v, layer, lo, hi, positions)
    with torch.no_grad(), guard:
        seqs, logits = _generate(a, ids, mask)
    with torch.no_grad():
        ref, fired = _reference(a, seqs, mask, _cap_ref(v, layer, lo, hi), positions)
        plain = _generate(a, ids, mask)[1]
    assert torch.allclose(logits, ref, atol=1e-4), (logits - ref).abs().max()
    assert not torch.allclose(logits, plain, atol=1e-3)  # the cap did something
    assert guard.last.fired == fired
    assert sum(guard.last.touched) > 0


@pytest.mark.parametrize("positions", ["response", "all"])
@pytest.mark.parametrize("layers", [(2, 2), (1, 3)])
def test_conditional_matches_uncached_reference(layers, positions):
    model, tok = tiny_pair("qwen2")
    a = ModelAdapter(model, tok)
    ids, mask = _batch(a)
    g = torch.Generator().manual_seed(2)
    c, v = torch.randn(a.hidden_size, generator=g), torch.randn(a.hidden_size, generator=g)
    cond_layer, layer = layers
    seqs0, _ = _generate(a, ids, mask)
    p = _projections(a, seqs0, torch.cat([mask, torch.ones(3, N_NEW, dtype=torch.long)], 1), c, cond_layer)
    thr = float(p.quantile(0.5))
    coef = torch.tensor([3.0, -3.0, 5.0])  # per row
    guard = Guard(a).conditional(c, cond_layer, thr, v, layer, coef, positions)
    with torch.no_grad(), guard:
        seqs, logits = _generate(a, ids, mask)
    with torch.no_grad():
        ref, fired = _reference(a, seqs, mask, _cond_ref(c, cond_layer, thr, v, layer, coef.view(-1, 1, 1)),
                                positions)
        plain = _generate(a, ids, mask)[1]
    assert torch.allclose(logits, ref, atol=1e-4), (logits - ref).abs().max()
    assert not torch.allclose(logits, plain, atol=1e-3)
    assert guard.last.fired == fired
    assert any(not f for row in fired for f in row)  # conditional: it does not act everywhere


def test_cap_inside_the_range_is_bit_identical(qwen_tiny):
    a = qwen_tiny
    ids, mask = _batch(a)
    v = torch.randn(a.hidden_size)
    with torch.no_grad():
        plain = a.model(input_ids=ids, attention_mask=mask).logits
        guard = Guard(a).cap(v, 2, -1e6, 1e6, "all")
        with guard:
            capped = a.model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(plain, capped)
    assert guard.last.touched == [0, 0, 0]


def test_cap_clamps_and_ablate_conditional_zeroes(qwen_tiny):
    a = qwen_tiny
    ids, mask = _batch(a)
    v = torch.randn(a.hidden_size)
    u = v / v.norm()
    seen = {}
    with torch.no_grad(), Guard(a).cap(v, 2, -0.5, 0.25, "all"):
        hd = a.blocks[1].register_forward_hook(lambda m, i, o: seen.setdefault("h", block_output(o)))
        a.model(input_ids=ids, attention_mask=mask)
        hd.remove()
    p = (seen["h"] @ u)[mask.bool()]
    assert p.max() <= 0.25 + 1e-5 and p.min() >= -0.5 - 1e-5
    seen.clear()
    with torch.no_grad(), Guard(a).conditional(v, 2, 0.0, mode="ablate", positions="all"):
        hd = a.blocks[1].register_forward_hook(lambda m, i, o: seen.setdefault("h", block_output(o)))
        a.model(input_ids=ids, attention_mask=mask)
        hd.remove()
    p = (seen["h"] @ u)[mask.bool()]
    assert p.max() <= 1e-5 and p.min() < -1e-3  # positives ablated to 0, negatives left alone


def test_finished_rows_and_padding_are_not_counted(qwen_tiny):
    a = qwen_tiny
    ids, mask = _batch(a)
    eos = a.tokenizer.eos_token_id
    v = torch.randn(a.hidden_size)
    guard = Guard(a).cap(v, 2, 0.0, 0.0, "all")  # acts at every position with a non-zero projection
    with torch.no_grad(), guard:
        a.model(input_ids=ids, attention_mask=mask)  # prefill: acts on every row
        cache_out = a.model(input_ids=ids, attention_mask=mask, use_cache=True)
        step = torch.tensor([[eos], [65], [eos]])
        m2 = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
        a.model(input_ids=step, attention_mask=m2, position_ids=position_ids_for(m2)[:, -1:],
                use_cache=True, **{cache_kwarg(a.model): output_cache(cache_out)})
    assert guard.last.fired == [[True, False], [True, True], [True, False]]
    guard.select_rows([1])
    assert guard.last.fired == [[True, True]] and guard.last.touched == [2]


def test_bad_specs_are_rejected(qwen_tiny):
    a = qwen_tiny
    v = torch.randn(a.hidden_size)
    with pytest.raises(ValueError, match="above the steering layer"):
        Guard(a).conditional(v, 3, 0.0, v, 1)
    with pytest.raises(ValueError, match="lo 2 > hi 1"):
        Guard(a).cap(v, 1, 2, 1)
    with pytest.raises(ValueError, match="needs lo, hi"):
        Guard(a).cap(v, 1)
    with pytest.raises(ValueError, match="out of range"):
        Guard(a).cap(v, 9, hi=1.0)
    with pytest.raises(ValueError, match="needs \\(32,\\)"):
        Guard(a).cap(torch.randn(5), 1, hi=1.0)


def test_calibration_reads_what_the_guard_reads_and_round_trips(tmp_path, qwen_tiny):
    from personascope.monitor.trace import trace_answers
    from personascope.steering.calibration import GuardCalibration, calibrate_guard, guard_for, with_calibration
    from personascope.vectors.file import PersonaVector, base_metadata, load_vector

    a = qwen_tiny
    g = torch.Generator().manual_seed(5)
    pv = PersonaVector({"response_avg": torch.randn(a.n_layers + 1, a.hidden_size, generator=g)},
                       torch.ones(a.n_layers + 1), base_metadata(a, "optimistic"))
    qs = ["How do I boil an egg?", "What is a good name for a cat?", "Why is the sky blue?"]
    cal = calibrate_guard(a, pv, layer=2, percentile=90, questions=qs, max_new_tokens=5, batch_size=2)
    assert cal.n == len(cal.values) and cal.n_questions == 3 and cal.lo < cal.hi
    want = torch.quantile(torch.tensor(cal.values, dtype=torch.float64), 0.9)
    assert cal.hi == pytest.approx(float(want))
    # each answer's values: the last prompt token, then every answer token but the last (teacher-forced check)
    prompts = [a.prompt(q) for q in qs]
    answers = []
    for p in prompts:  # one at a time: no padding, the generated ids as they are
        ids = torch.tensor([a.encode_prompt(p)])
        with torch.no_grad():
            out = a.model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=pad_id(a.tokenizer))
        answers.append(out[0, ids.shape[1]:].tolist())
    assert all(len(x) == 5 and a.tokenizer.eos_token_id not in x for x in answers)
    traces = trace_answers(a, prompts, answers, pv, 2)
    expected = [x for t in traces for x in [t.prompt_value[2], *t.at()[:4]]]
    assert cal.values == pytest.approx(expected, abs=1e-4)
    resp = calibrate_guard(a, pv, layer=2, percentile=90, questions=qs, max_new_tokens=5, distribution="response")
    assert resp.n == 3
    path = with_calibration(pv, cal).save(tmp_path / "v.safetensors")
    back = GuardCalibration.from_vector(load_vector(path))
    assert (back.layer, back.hi, back.lo, back.percentile, back.n) == (2, cal.hi, cal.lo, 90, cal.n)
    guard = guard_for(a, load_vector(path), "cap")
    assert guard.specs[0].hi == cal.hi and guard.specs[0].lo is None
    with pytest.raises(ValueError, match="calibrated at layer 2"):
        guard_for(a, load_vector(path), "conditional", layer=1)
    with pytest.raises(ValueError, match="no guard calibration"):
        guard_for(a, pv, "cap")


def test_cli_calibrate_then_evaluate_and_watch_with_the_guard(tmp_path):
    import json

    from typer.testing import CliRunner

    from personascope.cli.main import app
    from personascope.steering.calibration import GuardCalibration
    from personascope.vectors.file import PersonaVector, base_metadata, load_vector

    model, tok = tiny_pair("qwen2", seed=4)
    a = ModelAdapter(model, tok)
    model_dir = tmp_path / "tiny-model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    g = torch.Generator().manual_seed(6)
    PersonaVector({"response_avg": torch.randn(a.n_layers + 1, a.hidden_size, generator=g)},
                  torch.ones(a.n_layers + 1), base_metadata(a, "humorous")).save(tmp_path / "v.safetensors")
    run = CliRunner().invoke
    env = {"COLUMNS": "200"}
    common = ["--model", str(model_dir), "--device", "cpu"]
    res = run(app, ["guard", "calibrate", "--vector", str(tmp_path / "v.safetensors"), "--out",
                    str(tmp_path / "g.safetensors"), "--layer", "2", "--n-questions", "3", "--max-new-tokens", "4",
                    "--percentile", "60", *common], env=env)
    assert res.exit_code == 0, res.output
    cal = GuardCalibration.from_vector(load_vector(tmp_path / "g.safetensors"))
    assert (cal.layer, cal.percentile, cal.n_questions) == (2, 60.0, 3)
    assert f"[{cal.lo:+.3f}, {cal.hi:+.3f}]" in res.output
    res = run(app, ["guard", "calibrate", "--vector", str(tmp_path / "v.safetensors"), "--out", str(tmp_path / "x"),
                    "--distribution", "words", *common], env=env)
    assert res.exit_code == 2 and "--distribution must be one of token, response" in res.output
    res = run(app, ["watch", "--vector", str(tmp_path / "g.safetensors"), "--guard", "cap", "--max-new-tokens", "4",
                    "--temperature", "0", *common], input="hello\n", env=env)
    assert res.exit_code == 0, res.output
    assert "guard acted on" in res.output and "acts above" in res.output
    res = run(app, ["watch", "--vector", str(tmp_path / "v.safetensors"), "--guard", "cap", *common], input="hi\n",
              env=env)
    assert res.exit_code == 2 and "no guard calibration" in res.output
    out = tmp_path / "eval"
    res = run(app, ["evaluate", "humorous", "--vector", str(tmp_path / "g.safetensors"), "--layer", "2", "--coef",
                    "-3", "--guard", "cap", "--guard", "conditional", "--questions", "2", "--judge-model",
                    str(model_dir), "--out", str(out), "--capability", "--capability-file", str(_mc(tmp_path)),
                    *common], env=env)
    assert res.exit_code == 0, res.output
    rows = json.loads((out / "summary.json").read_text())
    assert [r["guard"] for r in rows] == [None, None, "cap", "conditional"]
    assert rows[3]["condition"] == f"L2:c-3-if>{cal.hi:.4g}:response" and rows[2]["guard_hi"] == cal.hi
    assert all(r["guard_touched_mean"] is not None for r in rows[2:]) and all("capability" in r for r in rows)
    assert "guard tokens/answer" in res.output


def _mc(folder):
    import json

    path = folder / "mc.jsonl"
    rows = [{"question": f"q{i}", "choices": ["a", "b", "c", "d"], "answer": "B"} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
