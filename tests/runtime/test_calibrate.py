"""`--engine auto` and the CPU dtype by measurement: the decision on stubbed timings, the cache, the real timer."""

import pytest
import torch
from tiny import tiny_pair

from personascope.model import calibrated_cpu_dtype, pick_dtype
from personascope.model.adapter import ModelAdapter
from personascope.runtime.engines import base
from personascope.runtime.engines.calibrate import (
    Timing,
    cached_timings,
    calibrate,
    candidates,
    decide,
    time_hf,
)

# the measurements, as a stubbed timing function: new tok/s and start-up seconds per (engine, dtype)
AVX2_ONLY = {("hf", "bf16"): (0.6, 0.0), ("hf", "fp32"): (10.0, 0.0), ("vllm", "bf16"): (2.0, 60.0),
             ("vllm", "fp32"): (32.0, 30.0)}
AVX512_BF16 = {("hf", "bf16"): (67.3, 0.0), ("hf", "fp32"): (10.0, 0.0), ("vllm", "bf16"): (45.8, 95.0),
               ("vllm", "fp32"): (34.9, 31.0)}


def stub(table):
    calls = []

    def timer(engine, dtype):
        calls.append((engine, dtype))
        rate, start = table[(engine, dtype)]
        return Timing(engine, dtype, rate, start)

    timer.calls = calls  # type: ignore[attr-defined]
    return timer


def timings(table):
    t = stub(table)
    return [t(e, d) for e, d in table]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONASCOPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PERSONASCOPE_DTYPE", raising=False)
    return tmp_path / "cache"


def test_avx2_only_machine_picks_fp32_and_vllm_only_for_big_jobs():
    small, big = decide(timings(AVX2_ONLY), 1_000), decide(timings(AVX2_ONLY), 1_000_000)
    assert (small.engine, small.dtype) == ("hf", "fp32")  # 30 s of vLLM start-up does not pay for 25 s of work
    assert (big.engine, big.dtype) == ("vllm", "fp32")
    assert "hf fp32 10.0 tok/s" in big.line() and "vllm fp32 32.0 tok/s, start-up 30 s" in big.line()


def test_avx512_bf16_machine_picks_hf_bf16_at_every_size():
    for work in (1_000, 100_000, 100_000_000):
        c = decide(timings(AVX512_BF16), work)
        assert (c.engine, c.dtype) == ("hf", "bf16")


def test_explicit_engine_and_dtype_win():
    assert decide(timings(AVX512_BF16), 10**8, engine="vllm").engine == "vllm"
    assert decide(timings(AVX512_BF16), 10**8, engine="vllm").dtype == "bf16"
    assert decide(timings(AVX2_ONLY), 10**8, dtype="bf16") .dtype == "bf16"
    assert (decide(timings(AVX2_ONLY), 10, engine="hf", dtype="fp32").engine, "fp32") == ("hf", "fp32")


def test_the_loaded_dtype_stays_within_the_margin_and_failures_never_win():
    close = [Timing("hf", "bf16", 11.0), Timing("hf", "fp32", 10.0)]
    assert decide(close, 1000, prefer=("hf", "fp32")).dtype == "fp32"
    assert decide(close, 1000).dtype == "bf16"
    broken = [Timing("hf", "bf16", 0.0, error="no kernel"), Timing("hf", "fp32", 1.0)]
    assert decide(broken, 1000).dtype == "fp32"
    with pytest.raises(ValueError, match="no kernel"):
        decide(broken[:1], 1000)


def test_candidates_follow_the_device_and_vllm():
    assert candidates("cpu", vllm=False) == [("hf", "bf16"), ("hf", "fp32")]
    assert len(candidates("cpu", vllm=True)) == 4
    assert candidates("cpu", vllm=True, engine="vllm", dtype="fp32") == [("vllm", "fp32")]
    assert candidates("cuda", vllm=False) == [("hf", "bf16")]


def test_calibration_is_measured_once_per_machine_and_model_and_sets_the_load_dtype(monkeypatch):
    timer = stub(AVX2_ONLY)
    first = calibrate("some-model", "cpu", timer)
    again = calibrate("some-model", "cpu", timer)
    assert timer.calls == [("hf", "bf16"), ("hf", "fp32")]  # the second call read the cache
    assert first == again == cached_timings("some-model")
    assert calibrated_cpu_dtype("some-model") is torch.float32
    assert pick_dtype(torch.device("cpu"), model="some-model") is torch.float32
    assert pick_dtype(torch.device("cpu"), "bf16", model="some-model") is torch.bfloat16  # explicit wins
    monkeypatch.setenv("PERSONASCOPE_DTYPE", "bf16")
    assert pick_dtype(torch.device("cpu"), model="some-model") is torch.bfloat16
    calibrate("other-model", "cpu", stub(AVX512_BF16))
    assert calibrated_cpu_dtype("other-model") is torch.bfloat16
    assert calibrated_cpu_dtype("some-model") is torch.float32


def test_resolve_engine_casts_the_model_to_the_measured_dtype_and_keeps_an_explicit_one(monkeypatch):
    model, tok = tiny_pair("qwen2")
    ad = ModelAdapter(model, tok)
    monkeypatch.setattr(base, "vllm_available", lambda: False)
    choice = base.resolve_engine("auto", ad, 10_000, timer=stub(AVX512_BF16))
    assert (choice.engine, choice.dtype) == ("hf", "bf16") and ad.model.dtype == torch.bfloat16
    monkeypatch.setenv("PERSONASCOPE_DTYPE", "fp32")
    ad.model.float()
    assert base.resolve_engine("hf", ad, 10_000).reason == "given"
    assert ad.model.dtype == torch.float32
    with pytest.raises(ValueError, match="unknown engine"):
        base.resolve_engine("fast", ad, 1)


def test_real_timer_measures_a_tiny_model_and_leaves_it_unchanged():
    model, _ = tiny_pair("qwen2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for dtype in ("bf16", "fp32"):
        t = time_hf(model, dtype, steps=2, rows=2, prompt_tokens=4)
        assert t.error is None and t.tok_s > 0 and t.dtype == dtype
    assert model.dtype == torch.float32
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_vllm_timer_gets_the_builtin_models_directory(monkeypatch):
    """The calibration times vLLM on the built-in model's directory, not on its bare name or an empty path."""
    import importlib
    from types import SimpleNamespace

    from personascope.model import resolve_model_path

    cal = importlib.import_module("personascope.runtime.engines.calibrate")

    seen = []
    monkeypatch.setattr(cal, "time_vllm", lambda path, dtype: seen.append(path) or cal.Timing("vllm", dtype, 1.0))
    cal.model_timer(SimpleNamespace(name="qwen2.5-coder-0.5b", model=None))("vllm", "bf16")
    assert seen == [resolve_model_path("qwen2.5-coder-0.5b")] and seen[0] not in ("", "qwen2.5-coder-0.5b")
