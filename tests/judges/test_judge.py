import itertools
import math

import pytest
import torch
from tiny import markov_model, tiny_pair, tiny_tokenizer

from personascope.judges.local import (
    JudgeRequest,
    LocalJudge,
    contrast_system,
    digit_tokens,
    expected_score,
    integer_distribution,
)
from personascope.model.adapter import ModelAdapter
from personascope.model.loading import DEFAULT_JUDGE_MODEL
from personascope.traits.trait import load_trait


def tid(tok, s):
    ids = tok(s, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, (s, ids)
    return ids[0]


@pytest.fixture
def tok():
    t = tiny_tokenizer()
    t.add_tokens(["42"])  # a multi-digit token: "42" has two digit-token paths
    return t


def test_exact_expectation_on_a_hand_built_distribution(tok):
    T = {s: tid(tok, s) for s in ["4", "2", "1", "0", "7", "x", "42", ">"]}
    table = {
        T[">"]: {T["4"]: 0.2, T["42"]: 0.1, T["1"]: 0.3, T["7"]: 0.1},  # the rest (0.3) -> "x"
        T["4"]: {T["2"]: 0.5},
        T["2"]: {},
        T["42"]: {},
        T["1"]: {T["0"]: 0.6},
        T["0"]: {T["0"]: 0.5},
        T["7"]: {},
    }
    model = markov_model(tok, table, filler=T["x"])
    first, cont = digit_tokens(tok)
    assert first[T["42"]] == "42"
    dist = integer_distribution(model, [T["x"], T[">"]], first, cont, prune=0.0)
    want = {4: 0.2 * 0.5, 42: 0.2 * 0.5 + 0.1, 1: 0.3 * 0.4, 10: 0.3 * 0.6 * 0.5, 100: 0.3 * 0.6 * 0.5 * 0.5, 7: 0.1}
    for n, p in want.items():
        assert dist[n] == pytest.approx(p, abs=1e-5), n
    assert sum(dist.values()) == pytest.approx(sum(want.values()), abs=1e-5)
    assert expected_score(dist) == pytest.approx(sum(n * p for n, p in want.items()) / sum(want.values()), abs=1e-3)


def test_missing_below_mass_threshold(tok):
    T = {s: tid(tok, s) for s in ["5", "x", ">"]}
    model = markov_model(tok, {T[">"]: {T["5"]: 0.2}, T["5"]: {}}, filler=T["x"])
    first, cont = digit_tokens(tok)
    dist = integer_distribution(model, [T[">"]], first, cont, prune=0.0)
    assert dist[5] == pytest.approx(0.2, abs=1e-5)
    assert expected_score(dist) is None
    model = markov_model(tok, {T[">"]: {T["5"]: 0.3}, T["5"]: {}}, filler=T["x"])
    assert expected_score(integer_distribution(model, [T[">"]], first, cont, prune=0.0)) == pytest.approx(5.0)


def test_tree_search_equals_naive_enumeration_on_a_random_model():
    model, tok = tiny_pair("qwen2", seed=3)
    first, cont = digit_tokens(tok)
    prompt = tok("score:", add_special_tokens=False)["input_ids"]
    dist = integer_distribution(model, prompt, first, cont, prune=0.0)
    digit_ids = torch.tensor(sorted(cont))
    naive = {}
    with torch.no_grad():
        for n in range(101):
            ids = [tid(tok, ch) for ch in str(n)]
            probs = model(torch.tensor([prompt + ids])).logits[0].float().softmax(-1)
            p = math.prod(float(probs[len(prompt) - 1 + i, t]) for i, t in enumerate(ids))
            p *= 1 - float(probs[-1, digit_ids].sum())
            naive[n] = p
    for n in range(101):
        assert dist.get(n, 0.0) == pytest.approx(naive[n], rel=1e-4, abs=1e-9)


def test_binary_mode_is_monotone_in_p_yes():
    tok = tiny_tokenizer()
    tok.add_tokens(["yes", "no"])
    nl, yes, no = tid(tok, "\n"), tid(tok, "yes"), tid(tok, "no")
    trait = load_trait("optimistic")
    scores = []
    for p in (0.1, 0.5, 0.9):
        model = markov_model(tok, {nl: {yes: p * 0.8, no: (1 - p) * 0.8}}, filler=tid(tok, "x"))
        judge = LocalJudge(model, tok, trait_mode="binary")
        s = judge.score([JudgeRequest("trait", "q?", "an answer", trait)])[0]
        assert s == pytest.approx(100 * p, abs=0.5)
        scores.append(s)
    assert scores == sorted(scores)
    model = markov_model(tok, {nl: {yes: 0.05, no: 0.05}}, filler=tid(tok, "x"))
    assert LocalJudge(model, tok, trait_mode="binary").score([JudgeRequest("trait", "q", "a", trait)]) == [None]


def test_logprob_coherence_prefers_likely_text(tok):
    a, b = tid(tok, "a"), tid(tok, "b")
    model = markov_model(tok, {a: {a: 0.9, b: 0.05}, b: {a: 0.9, b: 0.05}}, filler=tid(tok, "x"))
    judge = LocalJudge(model, tok, coherence_mode="logprob")
    fluent, broken = judge.score([JudgeRequest("coherence", "q", "aaaaaaaa"),
                                  JudgeRequest("coherence", "q", "abbbbbbb")])
    assert 0 <= broken < fluent <= 100


def test_contrastive_equals_direct_log_likelihood_difference():
    model, tok = tiny_pair("qwen2", seed=5)
    ad = ModelAdapter(model, tok)
    trait = load_trait("humorous")
    judge = LocalJudge(model, tok, trait_mode="contrastive", contrast_pairs=2)
    q, ans = "How do I cook rice?", "Rinse it, then simmer it."
    got = judge.score([JudgeRequest("trait", q, ans, trait)])[0]

    def mean_lp(system):
        p, r = ad.encode_pair(ad.prompt(q, system), ans)
        with torch.no_grad():
            lp = model(torch.tensor([p + r])).logits[0].float().log_softmax(-1)
        return sum(float(lp[len(p) - 1 + i, t]) for i, t in enumerate(r)) / len(r)

    delta = sum(mean_lp(contrast_system(trait, "pos", i)) - mean_lp(contrast_system(trait, "neg", i))
                for i in range(2)) / 2
    from personascope.judges.local import CONTRAST_SCALE

    assert got == pytest.approx(100 / (1 + math.exp(-CONTRAST_SCALE * delta)), abs=1e-3)


@pytest.mark.parametrize("mode", ["0_100", "fewshot", "binary", "contrastive"])
def test_every_mode_returns_0_100_or_none(mode):
    model, tok = tiny_pair("qwen2", seed=1)
    judge = LocalJudge(model, tok, trait_mode=mode, prune=1e-3)
    trait = load_trait("evil")
    out = judge.score([JudgeRequest("trait", q, a, trait) for q, a in itertools.product(["hi?"], ["", "ok", "no"])])
    assert all(s is None or (0 <= s <= 100 and not math.isnan(s)) for s in out)


def test_unknown_mode_is_named():
    model, tok = tiny_pair("qwen2")
    with pytest.raises(ValueError, match="unknown trait scoring mode 'likert'"):
        LocalJudge(model, tok, trait_mode="likert")


def test_auto_mode_uses_the_measured_table_only_for_its_judge_and_builtin_traits(tmp_path):
    import json as _json
    from importlib import resources

    from personascope.judges.local import auto_mode

    trait = load_trait("optimistic")
    assert auto_mode(trait, "local:some-other-judge") == "contrastive"
    assert auto_mode(None, f"local:{DEFAULT_JUDGE_MODEL}") == "contrastive"
    table_path = resources.files("personascope") / "data" / "judge_modes.json"
    if table_path.is_file():
        table = _json.loads(table_path.read_text())
        assert auto_mode(trait, table["judge"]) == table["trait_modes"]["optimistic"]
        user = tmp_path / "optimistic.json"
        user.write_text(_json.dumps({"instruction": [{"pos": "a", "neg": "b"}] * 5,
                                     "questions": [f"q{i}?" for i in range(40)], "eval_prompt": "{question}{answer}"}))
        assert auto_mode(load_trait(str(user)), table["judge"]) == "contrastive"
    model, tok = tiny_pair("qwen2")
    judge = LocalJudge(model, tok, trait_mode="auto", name="local:tiny")
    req = JudgeRequest("trait", "q", "a", trait)
    assert judge.resolve_mode(req) == "contrastive" and judge.describe_mode("trait", trait) == "auto:contrastive"
    assert ":contrastive:" in judge.rubric_key(req)


def test_auto_mode_matches_the_judge_by_model_not_by_display_string(tmp_path, monkeypatch):
    import inspect
    import json as _json
    from importlib import resources

    from personascope.cli.demo import run_demo
    from personascope.judges.local import auto_mode, judge_identity, load_local_judge
    from personascope.model.loading import DEFAULT_JUDGE_MODEL, builtin_dir

    monkeypatch.setenv("PERSONASCOPE_CACHE", str(tmp_path / "cache"))
    table = _json.loads((resources.files("personascope") / "data" / "judge_modes.json").read_text())
    assert judge_identity(table["judge"]) == DEFAULT_JUDGE_MODEL  # the measured table is for the default judge
    cache_path = builtin_dir(DEFAULT_JUDGE_MODEL)
    cache_path.mkdir(parents=True)
    trait = load_trait("optimistic")
    measured = table["trait_modes"]["optimistic"]
    assert measured != "contrastive"  # otherwise a failed match would look like a match
    for name in (f"local:{DEFAULT_JUDGE_MODEL}", DEFAULT_JUDGE_MODEL, str(cache_path), f"local:{cache_path}",
                 str(cache_path) + "/"):
        assert auto_mode(trait, name) == measured, name
    other = tmp_path / "other-model"
    other.mkdir()
    assert auto_mode(trait, f"local:{other}") == "contrastive"
    assert auto_mode(trait, "local:qwen2.5-coder-0.5b") == "contrastive"
    assert auto_mode(trait, f"api:{DEFAULT_JUDGE_MODEL}") == "contrastive"
    # one default name everywhere
    assert inspect.signature(load_local_judge).parameters["name"].default == DEFAULT_JUDGE_MODEL
    # the demo's None means: the probe judge on the subject model, else the default LLM judge (demo.demo_judge)
    assert inspect.signature(run_demo).parameters["judge_name"].default is None
