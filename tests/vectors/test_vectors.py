import pytest
import torch
from tiny import tiny_pair
from typer.testing import CliRunner

from personascope.cli.main import app
from personascope.model.adapter import ModelAdapter
from personascope.vectors.file import PersonaVector, VectorFileError, VectorMismatchError, base_metadata, load_vector


def _pv(a: ModelAdapter, **meta):
    vecs = {s: torch.randn(a.n_layers + 1, a.hidden_size) for s in ("response_avg", "prompt_avg", "prompt_last")}
    return PersonaVector(vecs, torch.rand(a.n_layers + 1) + 1, base_metadata(a, "evil", **meta))


def test_roundtrip_and_metadata(tmp_path, qwen_tiny):
    pv = _pv(qwen_tiny, kept_pairs="7")
    pv.save(tmp_path / "v.safetensors")
    got = load_vector(tmp_path / "v.safetensors")
    for s in pv.vectors:
        assert torch.equal(got.vectors[s], pv.vectors[s])
    assert torch.equal(got.resid_norm, pv.resid_norm)
    assert got.metadata["trait"] == "evil" and got.metadata["hidden_size"] == "32"
    assert got.metadata["config_hash"] == qwen_tiny.config_hash
    got.check(qwen_tiny)
    res = CliRunner().invoke(app, ["vector", "info", str(tmp_path / "v.safetensors")])
    assert res.exit_code == 0 and "config_hash" in res.output and "4 × 32" in res.output


def test_mismatches_are_named(tmp_path, qwen_tiny):
    wide, tok = tiny_pair("qwen2", hidden_size=64, intermediate_size=64)
    with pytest.raises(VectorMismatchError, match="hidden size 32.*has 64"):
        _pv(qwen_tiny).check(ModelAdapter(wide, tok))
    deep, tok = tiny_pair("qwen2", num_hidden_layers=5)
    with pytest.raises(VectorMismatchError, match="L=3.*L=5"):
        _pv(qwen_tiny).check(ModelAdapter(deep, tok))
    other, tok = tiny_pair("qwen2", rope_theta=5.0)
    with pytest.raises(VectorMismatchError, match="config hash"):
        _pv(qwen_tiny).check(ModelAdapter(other, tok))
    with pytest.raises(ValueError, match="layer 9 is out of range"):
        _pv(qwen_tiny).vector(9)


def test_paper_pt_files_load(tmp_path, qwen_tiny):
    t = torch.randn(qwen_tiny.n_layers + 1, qwen_tiny.hidden_size)
    torch.save(t, tmp_path / "evil_response_avg_diff.pt")
    pv = load_vector(tmp_path / "evil_response_avg_diff.pt")
    assert pv.trait == "evil" and torch.equal(pv.vector(2), t[2])
    pv.check(qwen_tiny)
    torch.save(torch.randn(3), tmp_path / "bad.pt")
    with pytest.raises(VectorFileError, match="expected a \\[L \\+ 1, d\\] tensor"):
        load_vector(tmp_path / "bad.pt")


def test_alpha_and_coef_are_inverse(qwen_tiny):
    pv = _pv(qwen_tiny)
    c = pv.coef_from_alpha(0.5, 2)
    assert pv.alpha_from_coef(c, 2) == pytest.approx(0.5)
    assert float(c * pv.vector(2).norm()) == pytest.approx(float(0.5 * pv.resid_norm[2]), rel=1e-5)


def test_default_layer_prefers_recorded_best(qwen_tiny):
    pv = _pv(qwen_tiny)
    assert pv.default_layer() == 2
    assert pv.with_metadata(best_layer=1).default_layer() == 1
    assert pv.default_layer(3) == 3


def _save_raw(path, tensors, meta=None):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("tensors, meta, message", [
    ({"response_avg": torch.full((4, 32), float("nan"))}, None, "non-finite"),
    ({"response_avg": torch.ones(4, 32), "prompt_avg": torch.tensor([[float("inf")] * 32] * 4)}, None,
     "'prompt_avg' holds non-finite"),
    ({"response_avg": torch.full((4, 32), 1e37)}, None, "overflows its norm"),
    ({"response_avg": torch.ones(4, 32, dtype=torch.int64)}, None, "dtype torch.int64"),
    ({"response_avg": torch.ones(4, 32), "prompt_last": torch.ones(5, 32)}, None, "'prompt_last' has shape"),
    ({"response_avg": torch.ones(4, 32), "resid_norm": torch.ones(3)}, None, "length L \\+ 1 = 4"),
    ({"response_avg": torch.ones(4, 32), "resid_norm": torch.tensor([1.0, float("nan"), 1.0, 1.0])}, None,
     "'resid_norm' holds non-finite"),
    ({"response_avg": torch.ones(4, 32)}, {"best_layer": "99"}, "best_layer 99 is outside the vector's layers 0..3"),
    ({"response_avg": torch.ones(4, 32)}, {"best_layer": "banana"}, "best_layer 'banana' is not an integer"),
    ({"response_avg": torch.ones(4, 32)}, {"n_layers": "7"}, "n_layers '7'"),
    ({"prompt_avg": torch.ones(4, 32)}, None, "no 'response_avg'"),
    ({"response_avg": torch.ones(32)}, None, "\\[L \\+ 1, d\\] matrix"),
])
def test_vector_contents_are_validated_on_load(tmp_path, tensors, meta, message):
    path = _save_raw(tmp_path / "v.safetensors", tensors, meta)
    with pytest.raises(VectorFileError, match=message) as e:
        load_vector(path)
    assert str(path) in str(e.value)


def test_unreadable_vector_files_are_clear_errors(tmp_path, qwen_tiny):
    good = _pv(qwen_tiny).save(tmp_path / "good.safetensors")
    raw = good.read_bytes()
    torch.save(torch.randn(4, 32), tmp_path / "good.pt")
    pt = (tmp_path / "good.pt").read_bytes()
    cases = {"empty.safetensors": b"", "truncated.safetensors": raw[: len(raw) // 2],
             "garbage.safetensors": b"\x00garbage" * 50, "empty.pt": b"", "truncated.pt": pt[: len(pt) // 2],
             "garbage.pt": b"not a torch file at all"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        kind = ".pt tensor" if name.endswith(".pt") else ".safetensors vector"
        with pytest.raises(VectorFileError, match=f"{name}: not a readable {kind} file"):
            load_vector(tmp_path / name)
    torch.save(torch.full((4, 32), float("nan")), tmp_path / "nan_response_avg_diff.pt")
    with pytest.raises(VectorFileError, match="non-finite"):
        load_vector(tmp_path / "nan_response_avg_diff.pt")
    torch.save({"not": "a tensor"}, tmp_path / "dict.pt")
    with pytest.raises(VectorFileError, match="got dict"):
        load_vector(tmp_path / "dict.pt")


def test_ready_made_vectors_by_name(tmp_path, monkeypatch):
    import personascope.vectors.file as vec

    pv = PersonaVector({"response_avg": torch.randn(3, 4)}, torch.ones(3), {"trait": "optimistic"})
    pv.save(tmp_path / "qwen2.5-coder-0.5b" / "optimistic.safetensors")
    pv.with_metadata(trait="evil").save(tmp_path / "other-model" / "evil.safetensors")
    pv.save(tmp_path / "other-model" / "optimistic.safetensors")
    monkeypatch.setattr(vec, "_packaged_dir", lambda: tmp_path)
    assert [(m, t) for m, t, _ in vec.packaged_vectors()] == [
        ("other-model", "evil"), ("other-model", "optimistic"), ("qwen2.5-coder-0.5b", "optimistic")]
    assert load_vector("optimistic").path.endswith("qwen2.5-coder-0.5b/optimistic.safetensors")
    assert load_vector("optimistic", model="other-model").path.endswith("other-model/optimistic.safetensors")
    assert load_vector("other-model/evil").trait == "evil"
    # evil exists only for other-model: a bare name for the default model is not found, and says what exists
    with pytest.raises(FileNotFoundError, match="ready-made vectors: evil, optimistic"):
        load_vector("evil")
    with pytest.raises(FileNotFoundError, match="no-such.safetensors does not exist"):
        load_vector("no-such.safetensors")


def test_vector_list_and_info_show_validity_and_steering(tmp_path, monkeypatch):
    import json

    import personascope.vectors.file as vec
    from personascope.vectors.validity import ValidityReport

    rep = ValidityReport([0, 1, 2], [0.5, 0.97, 0.9], [0.1, 0.95, 0.9], [0.0, 0.85, 0.2], None, None, 1)
    steering = {"alpha_plus": 1.0, "alpha_minus": -1.0, "delta_plus": 31.0, "delta_minus": -18.0}
    pv = PersonaVector({"response_avg": torch.randn(3, 4)}, torch.ones(3),
                       {"trait": "optimistic", "best_layer": "1", "validity": json.dumps(rep.to_dict()),
                        "steering": json.dumps(steering)})
    pv.save(tmp_path / "qwen2.5-coder-0.5b" / "optimistic.safetensors")
    import personascope.cli.commands.common as common

    monkeypatch.setattr(vec, "_packaged_dir", lambda: tmp_path)
    monkeypatch.setattr(common.console, "width", 250)
    res = CliRunner().invoke(app, ["vector", "list"])
    assert res.exit_code == 0, res.output
    row = next(line for line in res.output.splitlines() if "optimistic" in line)
    assert "0.97" in row and "0.95" in row and "-18 / +31" in row and "yes" in row
    res = CliRunner().invoke(app, ["vector", "info", "optimistic"])
    assert res.exit_code == 0, res.output
    assert "valid at layer 1" in res.output and "1 ←" in res.output
