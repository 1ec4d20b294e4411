"""Engines: the HF engine against the plain model, the vLLM engine against the HF engine (tiny models)."""

import importlib.util
import math

import numpy as np
import pytest
import torch
from tiny import markov_model, tiny_pair, tiny_tokenizer

from personascope.judges.local import JudgeRequest, LocalJudge
from personascope.model.adapter import ModelAdapter
from personascope.model.generate import SamplingConfig, generate_batch, run_generation
from personascope.runtime.engines.base import AUTO_MIN_TOKENS, choose_engine, vllm_available
from personascope.runtime.engines.hf import HFEngine, memory_batch_size
from personascope.runtime.engines.work import job_seed
from personascope.steering import SteeringSpec
from personascope.steering.steer import Steerer
from personascope.traits.trait import load_trait

HAS_VLLM = importlib.util.find_spec("vllm") is not None
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=12)
PREFIX = "You grade answers. Read the rubric carefully before you answer. "


def prompts_for(ad: ModelAdapter) -> list[str]:
    qs = ["hi", "what is two plus two?", "name a colour", "tell me a long story about a cat and a dog", "ok"]
    return [ad.prompt(q, system=PREFIX if i % 2 else None) for i, q in enumerate(qs)]


@pytest.fixture
def tiny():
    model, tok = tiny_pair("qwen2", seed=1, initializer_range=0.3)
    return ModelAdapter(model, tok)


def reference_logprobs(ad: ModelAdapter, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return ad.model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)


# ------------------------------------------------------------------------- HF engine


def test_hf_greedy_matches_one_prompt_at_a_time(tiny):
    prompts = prompts_for(tiny)
    want = [generate_batch(tiny, [p], GREEDY.max_new_tokens, temperature=0.0)[0] for p in prompts]
    assert HFEngine(tiny).generate(prompts, GREEDY) == want
    assert HFEngine(tiny, batch_size=2).generate(prompts, GREEDY) == want


def test_hf_last_token_logprobs_with_a_shared_prefix_equal_full_forwards(tiny):
    shared = [tiny.prompt(PREFIX * 2 + q) for q in ("a", "bb bb", "a much longer question here")]
    mixed = [*shared, tiny.prompt("x"), "plain text"]
    got = HFEngine(tiny).last_token_logprobs(mixed, top_k=5)
    for p, lp in zip(mixed, got, strict=True):
        ref = reference_logprobs(tiny, tiny.encode_prompt(p))[-1]
        top = ref.topk(5)
        assert list(lp) == top.indices.tolist()
        assert list(lp.values()) == pytest.approx(top.values.tolist(), abs=1e-4)


def test_hf_shared_prefix_cache_is_not_reused_under_steering(tiny):
    prompts = [tiny.prompt(PREFIX * 2 + q) for q in ("a", "bb bb")]
    engine = HFEngine(tiny)
    plain = engine.last_token_logprobs(prompts, top_k=3)
    v = torch.randn(tiny.hidden_size, generator=torch.Generator().manual_seed(2)) * 4
    with Steerer(tiny).add(v, 1, 3.0, "all"):
        steered = engine.last_token_logprobs(prompts, top_k=3)
        want = HFEngine(tiny).last_token_logprobs(prompts, top_k=3)
    assert steered == want != plain
    assert engine.last_token_logprobs(prompts, top_k=3) == plain


def test_hf_prompt_logprobs_equal_a_full_forward(tiny):
    prompts, answers = [tiny.prompt("q one"), tiny.prompt("a longer question two")], ["yes it is", "no"]
    got = HFEngine(tiny).prompt_logprobs(prompts, answers)
    for p, a, lps in zip(prompts, answers, got, strict=True):
        pi, ai = tiny.encode_pair(p, a)
        ref = reference_logprobs(tiny, pi + ai)
        want = [float(ref[len(pi) - 1 + k, t]) for k, t in enumerate(ai)]
        assert lps == pytest.approx(want, abs=1e-4)


def test_hf_steering_equals_the_steerer(tiny):
    v = torch.randn(tiny.hidden_size, generator=torch.Generator().manual_seed(0)) * 4
    prompts = prompts_for(tiny)[:3]
    with Steerer(tiny).add(v, 2, 3.0, "response"):
        want = [generate_batch(tiny, [p], GREEDY.max_new_tokens, temperature=0.0)[0] for p in prompts]
    got = HFEngine(tiny).generate(prompts, GREEDY, steering=[SteeringSpec(v, 2, 3.0, "response")])
    assert got == want
    assert got != HFEngine(tiny).generate(prompts, GREEDY)


def test_engine_generation_resumes_to_the_same_answers_and_keeps_the_callers_rng(tiny):
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=8, seed=3)
    jobs = [{"q": q, "sample": s} for q in ("a", "bb", "ccc", "dddd") for s in range(2)]
    engine = HFEngine(tiny, batch_size=3)

    def run(store: dict) -> int:
        return run_generation(tiny, jobs, lambda j: tiny.prompt(j["q"]), lambda j: (j["q"], j["sample"]) in store,
                              lambda rows: store.update({(r["q"], r["sample"]): r["answer"] for r in rows}), cfg,
                              engine=engine)

    state = torch.get_rng_state()
    full: dict = {}
    assert run(full) == len(jobs)
    assert torch.equal(torch.get_rng_state(), state)
    partial = {k: v for i, (k, v) in enumerate(sorted(full.items())) if i % 3}
    assert run(partial) == len(jobs) - len([i for i in range(len(jobs)) if i % 3])
    assert partial == full
    assert len(set(full.values())) > 1


def test_screening_and_datasets_run_on_an_engine_with_the_same_results(tiny, tmp_path):
    """screen_dataset's own answers and make_dataset's rows come from the engine; greedy ΔP equals the plain path."""
    import json

    from personascope.finetuning.datasets import DatasetConfig, make_dataset
    from personascope.screen.run import ScreenConfig, screen_dataset
    from personascope.vectors.file import PersonaVector

    g = torch.Generator().manual_seed(0)
    pv = PersonaVector({"response_avg": torch.randn(tiny.n_layers + 1, tiny.hidden_size, generator=g)},
                       torch.ones(tiny.n_layers + 1), {"trait": "optimistic"})
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in (("hi", "hello there"), ("name a colour", "blue"), ("two plus two?", "four, I think"))]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = ScreenConfig(max_new_tokens=6, batch_size=2)
    calls = {"n": 0}
    engine = HFEngine(tiny)
    real = engine.generate

    def counted(*a, **kw):
        calls["n"] += 1
        return real(*a, **kw)

    engine.generate = counted  # type: ignore[method-assign]
    plain = screen_dataset(tiny, data, {"o": pv}, out_dir=tmp_path / "plain", config=cfg, plots=False)
    on_engine = screen_dataset(tiny, data, {"o": pv}, out_dir=tmp_path / "eng", config=cfg, plots=False,
                               engine=engine)
    assert calls["n"] == 1
    assert np.allclose(plain.delta_p["o"], on_engine.delta_p["o"], atol=1e-5)

    res = make_dataset(tiny, load_trait("optimistic"), "I", tmp_path / "I.jsonl", None,
                       DatasetConfig(n=4, sampling=SamplingConfig(max_new_tokens=5, batch_size=2)), engine=engine)
    assert res.rows == 4 and calls["n"] > 1


def test_binary_judge_through_the_hf_engine_matches_the_plain_path():
    tok = tiny_tokenizer()
    tok.add_tokens(["yes", "no"])
    nl = tok("\n", add_special_tokens=False)["input_ids"][0]
    yes, no = (tok(w, add_special_tokens=False)["input_ids"][0] for w in ("yes", "no"))
    model = markov_model(tok, {nl: {yes: 0.3, no: 0.5}}, filler=tok("x", add_special_tokens=False)["input_ids"][0])
    trait = load_trait("optimistic")
    reqs = [JudgeRequest("trait", "q?", "an answer", trait), JudgeRequest("coherence", "q", "a")]
    plain = LocalJudge(model, tok, trait_mode="binary").score(reqs)
    judge = LocalJudge(model, tok, trait_mode="binary")
    judge.engine = HFEngine(judge.adapter)
    assert judge.score(reqs) == pytest.approx(plain, abs=1e-3)
    assert plain[0] == pytest.approx(100 * 0.3 / 0.8, abs=0.5)


def test_contrastive_judge_through_the_hf_engine_matches_the_plain_path(tiny):
    trait = load_trait("optimistic")
    reqs = [JudgeRequest("trait", "how are you?", "fine, thanks", trait), JudgeRequest("coherence", "q", "a b")]
    plain = LocalJudge(tiny.model, tiny.tokenizer, trait_mode="contrastive", coherence_mode="logprob").score(reqs)
    fast = LocalJudge(tiny.model, tiny.tokenizer, trait_mode="contrastive", coherence_mode="logprob",
                      engine=HFEngine(tiny)).score(reqs)
    assert fast == pytest.approx(plain, abs=1e-3)


def test_memory_batch_size_is_bounded_and_shrinks_with_length(tiny):
    short, long = memory_batch_size(tiny, 100), memory_batch_size(tiny, 100_000)
    assert 1 <= long <= short <= 64
    assert long < short


def test_engine_choice():
    assert choose_engine("hf", 10**9) == "hf"
    assert choose_engine("auto", AUTO_MIN_TOKENS - 1) == "hf"
    assert choose_engine("auto", AUTO_MIN_TOKENS) == ("vllm" if vllm_available() else "hf")
    with pytest.raises(ValueError, match="unknown engine 'fast'"):
        choose_engine("fast", 1)
    if not vllm_available():
        with pytest.raises(ValueError, match=r"personascope\[vllm\]"):
            choose_engine("vllm", 1)
    assert job_seed(1, "p", 0) != job_seed(1, "p", 1) != job_seed(2, "p", 1)
    assert job_seed(1, "p", 0, 3) != job_seed(1, "p", 0, 23)  # a cycled question is sampled afresh


def test_an_engine_that_seeds_each_prompt_samples_a_repeated_question_afresh(tiny):
    """make_dataset on extraction questions asks one question under several ids: an engine that seeds each
    prompt (vLLM) must not give them all the same answer."""
    from personascope.model.generate import SamplingConfig, run_generation
    from personascope.runtime.engines.hf import HFEngine

    class PerPromptSeeds(HFEngine):
        """HF generating one prompt at a time with the seed it is handed (as vLLM seeds each request)."""

        seeds_per_prompt = True

        def generate(self, prompts, sampling, seeds=None, steering=()):
            return [super(PerPromptSeeds, self).generate([p], sampling, [s])[0]
                    for p, s in zip(prompts, seeds or [None] * len(prompts), strict=True)]

    jobs = [{"question": q, "sample": 0} for q in (3, 23, 43, 63)]
    got: list[dict] = []
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=12, seed=0)
    run_generation(tiny, jobs, lambda j: tiny.prompt("The same question"), lambda j: False, got.extend, cfg,
                   engine=PerPromptSeeds(tiny))
    assert len({r["answer"] for r in got}) > 1


# ------------------------------------------------------------------------- vLLM engine

needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (pip install 'personascope[vllm]')")
VLLM_TINY = dict(seed=1, initializer_range=0.3, hidden_size=128, num_attention_heads=4)  # CPU attention: head 32


@pytest.fixture(scope="module")
def vllm_pair(tmp_path_factory):
    """(HF adapter, steerable VLLMEngine) on the same tiny model saved to disk."""
    from personascope.runtime.engines.vllm_engine import VLLMEngine

    model, tok = tiny_pair("qwen2", **VLLM_TINY)
    path = tmp_path_factory.mktemp("tiny-qwen2")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    ad = ModelAdapter(model, tok)
    eng = VLLMEngine(str(path), tokenizer=tok, fallback=HFEngine(ad), dtype=torch.float32, max_model_len=256,
                     steerable=True, kv_cache_gb=1)
    return ad, eng


@needs_vllm
def test_vllm_greedy_text_equals_hf(vllm_pair):
    ad, eng = vllm_pair
    prompts = prompts_for(ad)
    assert eng.generate(prompts, GREEDY) == HFEngine(ad).generate(prompts, GREEDY)


@needs_vllm
def test_vllm_logprobs_equal_hf(vllm_pair):
    ad, eng = vllm_pair
    prompts = prompts_for(ad)
    for got, want in zip(eng.last_token_logprobs(prompts, 5), HFEngine(ad).last_token_logprobs(prompts, 5),
                         strict=True):
        assert list(got) == list(want)
        assert list(got.values()) == pytest.approx(list(want.values()), abs=2e-3)
    answers = ["yes it is", "no", "maybe so", "a b c", "z"]
    for got, want in zip(eng.prompt_logprobs(prompts, answers), HFEngine(ad).prompt_logprobs(prompts, answers),
                         strict=True):
        assert got == pytest.approx(want, abs=2e-3)


@needs_vllm
def test_vllm_constant_steering_at_all_positions_equals_hf(vllm_pair):
    ad, eng = vllm_pair
    prompts = prompts_for(ad)
    v = torch.randn(ad.hidden_size, generator=torch.Generator().manual_seed(0))
    for layer in (0, 2):
        steering = [SteeringSpec(v, layer, 4.0, "all")]
        want = HFEngine(ad).generate(prompts, GREEDY, steering=steering)
        assert eng.generate(prompts, GREEDY, steering=steering) == want
        with eng.steered(steering):
            got = eng.last_token_logprobs(prompts, 5)
        with Steerer(ad).add(v, layer, 4.0, "all"):
            ref = HFEngine(ad).last_token_logprobs(prompts, 5)
        for g, r in zip(got, ref, strict=True):
            assert list(g.values()) == pytest.approx(list(r.values()), abs=2e-3)
    assert eng.generate(prompts, GREEDY, steering=steering) != eng.generate(prompts, GREEDY)
    assert not eng.messages


@needs_vllm
def test_vllm_falls_back_to_hf_for_other_positions(vllm_pair):
    ad, eng = vllm_pair
    v = torch.randn(ad.hidden_size, generator=torch.Generator().manual_seed(1))
    steering = [SteeringSpec(v, 1, 4.0, "response")]
    prompts = prompts_for(ad)[:2]
    with pytest.warns(UserWarning, match="positions=all"):
        got = eng.generate(prompts, GREEDY, steering=steering)
    assert got == HFEngine(ad).generate(prompts, GREEDY, steering=steering)
    assert "HF engine" in eng.messages[-1]


@needs_vllm
def test_vllm_sampling_is_seeded_per_prompt_and_keeps_the_callers_rng(vllm_pair):
    ad, eng = vllm_pair
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=10)
    prompts = prompts_for(ad)[:3]
    state = torch.get_rng_state()
    a = eng.generate(prompts, cfg, seeds=[1, 2, 3])
    assert torch.equal(torch.get_rng_state(), state)
    assert eng.generate(prompts[1:], cfg, seeds=[2, 3]) == a[1:]


# ------------------------------------------------------------------------- built-in model


@pytest.mark.model
@needs_vllm
def test_builtin_05b_greedy_text_hf_vs_vllm():
    from personascope.model.loading import load_model, resolve_model_path
    from personascope.runtime.engines.vllm_engine import VLLMEngine

    model, tok = load_model("qwen2.5-coder-0.5b", device="cpu")
    ad = ModelAdapter(model, tok)
    questions = ["What is a closure in Python?", "How do I reverse a list?", "Explain recursion briefly.",
                 "What does HTTP 404 mean?", "Name three sorting algorithms.", "What is a mutex?",
                 "How do I read a file in Python?", "What is Big-O notation?"]
    prompts = [ad.prompt(q) for q in questions]
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=32)
    hf = HFEngine(ad).generate(prompts, cfg)
    eng = VLLMEngine(resolve_model_path("qwen2.5-coder-0.5b"), tokenizer=tok, dtype=torch.bfloat16,
                     max_model_len=1024, steerable=True)  # eager: skips minutes of graph compilation
    vl = eng.generate(prompts, cfg)
    same = sum(a == b for a, b in zip(hf, vl, strict=True)) / len(hf)
    assert same >= 0.75, list(zip(hf, vl, strict=True))
    assert all(math.isfinite(len(t)) and t for t in vl)


def test_make_engine_and_judge_engine_choose_hf_for_small_jobs(tiny):
    from personascope.judges.api import OpenAIJudge
    from personascope.runtime.engines.base import make_engine, make_judge_engine

    assert isinstance(make_engine("auto", tiny, work_tokens=10), HFEngine)
    judge = LocalJudge(tiny.model, tiny.tokenizer, trait_mode="binary")
    assert make_judge_engine("hf", judge, n_judgements=4) == "hf"
    assert isinstance(judge.engine, HFEngine) and judge.engine.adapter.model is tiny.model
    assert make_judge_engine("hf", OpenAIJudge("http://localhost:1", "m"), n_judgements=4) is None
