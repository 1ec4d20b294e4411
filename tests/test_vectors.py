import pytest
import torch
from tiny import tiny_pair
from typer.testing import CliRunner

from personascope.adapter import ModelAdapter
from personascope.cli import app
from personascope.vectors import PersonaVector, VectorMismatchError, base_metadata, load_vector


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
    with pytest.raises(VectorMismatchError, match="expected a \\[L \\+ 1, d\\] tensor"):
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
