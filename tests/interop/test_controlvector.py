"""GGUF control vectors: the layer mapping checked by repeng's own reader and steering code, round trips, refusals."""

import copy

import gguf
import numpy as np
import pytest
import torch
from tiny import tiny_pair
from typer.testing import CliRunner

from personascope.cli.main import app
from personascope.interop.formats import (
    ControlVectorError,
    LayerChoice,
    choose_coefs,
    export_gguf,
    import_gguf,
    llama_cpp_steerer,
    parse_layers,
    read_gguf,
)
from personascope.model.adapter import ModelAdapter
from personascope.steering.steer import Steerer
from personascope.vectors.file import PersonaVector, VectorMismatchError, base_metadata, load_vector

N_BLOCKS = 5  # rows 0..5; llama.cpp can take rows 2..5 (blocks 1..4)


@pytest.fixture
def adapter():
    model, tok = tiny_pair("qwen2", num_hidden_layers=N_BLOCKS)
    return ModelAdapter(model, tok)


def make_vector(adapter: ModelAdapter, seed: int = 1) -> PersonaVector:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(adapter.n_layers + 1, adapter.hidden_size, generator=g)
    resid = torch.rand(adapter.n_layers + 1, generator=g) * 10 + 1
    return PersonaVector({"response_avg": rows}, resid, base_metadata(adapter, "evil", best_layer=3))


def logits(adapter: ModelAdapter, steerer: Steerer | None = None, model=None) -> torch.Tensor:
    ids = torch.tensor([[5, 70, 71, 33, 100, 2, 9, 44]])
    with torch.no_grad():
        if steerer is None:
            return (model or adapter.model)(input_ids=ids).logits
        with steerer:
            return adapter.model(input_ids=ids).logits


def steered(adapter, pv, rows, coef, positions="all") -> Steerer:
    st = Steerer(adapter)
    for r in rows:
        st.add(pv, r, coef, positions)
    return st


@pytest.fixture
def repeng(monkeypatch):
    """repeng 0.4.0 (latest) names np.float_ at import, removed in NumPy 2: alias it just for the import."""
    monkeypatch.setattr(np, "float_", np.float64, raising=False)
    return pytest.importorskip("repeng", reason="repeng is not installed (make install adds it with --no-deps)")


def test_repeng_reads_our_export_at_the_right_block(adapter, repeng, tmp_path):
    pv = make_vector(adapter)
    res = export_gguf(pv, tmp_path / "evil.gguf", choose_coefs(pv, [3, 5], coef=2.5))
    assert res.blocks == [2, 4] and res.layer_range == (2, 4)
    assert res.llama_cpp_args(0.5) == f"--control-vector-scaled {res.path}:0.5 --control-vector-layer-range 2 4"
    cv = repeng.ControlVector.import_gguf(str(res.path))
    assert cv.model_type == "qwen2"
    assert sorted(cv.directions) == [2, 4]  # row l -> direction.{l-1}
    for row in (3, 5):
        np.testing.assert_allclose(cv.directions[row - 1], 2.5 * pv.vector(row).numpy(), rtol=1e-6)
    # repeng's own steering adds directions[N] to the output of model.layers[N]: it must equal our hook
    wrapped = repeng.ControlModel(copy.deepcopy(adapter.model), [2, 4])
    wrapped.set_control(cv, 1.0)
    theirs = logits(adapter, model=wrapped)
    ours = logits(adapter, steered(adapter, pv, [3, 5], 2.5))
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    off_by_one = logits(adapter, steered(adapter, pv, [2, 4], 2.5))
    assert (theirs - off_by_one).abs().max() > 1e-2
    assert (theirs - logits(adapter)).abs().max() > 1e-2


def test_round_trip_restores_rows_and_steering(adapter, tmp_path):
    pv = make_vector(adapter)
    res = export_gguf(pv, tmp_path / "evil.gguf", choose_coefs(pv, parse_layers(pv, layer_range=(2, 5)), coef=3.0))
    back = import_gguf(res.path, adapter)
    assert back.trait == "evil" and back.metadata["source"] == "personascope control vector"
    for row in range(2, 6):
        torch.testing.assert_close(back.vector(row), pv.vector(row), rtol=1e-6, atol=1e-6)
    assert back.vectors["response_avg"][:2].abs().max() == 0
    torch.testing.assert_close(back.resid_norm, pv.resid_norm)
    assert back.coef_from_alpha(0.5, 4) == pytest.approx(pv.coef_from_alpha(0.5, 4), rel=1e-5)
    back.check(adapter)
    saved = load_vector(back.save(tmp_path / "back.safetensors"))
    for positions in ("response", "all"):
        torch.testing.assert_close(logits(adapter, steered(adapter, saved, [4], 1.7, positions)),
                                   logits(adapter, steered(adapter, pv, [4], 1.7, positions)))
    # the file as llama.cpp applies it (scale 1, every position) = the original at the baked-in coef 3
    torch.testing.assert_close(logits(adapter, llama_cpp_steerer(adapter, read_gguf(res.path))),
                               logits(adapter, steered(adapter, pv, [2, 3, 4, 5], 3.0)))


def test_alpha_is_converted_per_layer_and_baked_in(adapter, tmp_path):
    pv = make_vector(adapter)
    choice = choose_coefs(pv, [2, 4], alpha=0.3)
    res = export_gguf(pv, tmp_path / "a.gguf", choice)
    cv = read_gguf(res.path)
    for row in (2, 4):
        want = pv.coef_from_alpha(0.3, row)
        assert res.coefs[row] == pytest.approx(want)
        torch.testing.assert_close(cv.directions[row - 1], want * pv.vector(row), rtol=1e-5, atol=1e-6)
    assert res.coefs[2] != pytest.approx(res.coefs[4])
    assert cv.fields["personascope.alpha"] == pytest.approx(0.3)
    assert not any("no coefficient baked in" in w for w in res.warnings)
    plain = export_gguf(pv, tmp_path / "b.gguf", choose_coefs(pv, [2]))
    assert any("every position" in w for w in plain.warnings)
    assert any("no coefficient baked in" in w for w in plain.warnings)


@pytest.mark.parametrize("layers, layer_range, match", [
    ("0", None, "layer 0 cannot be exported"),
    ("1,3", None, "layer 1 cannot be exported"),
    (None, (1, 3), "layer 1 cannot be exported"),
    (None, (4, 2), "start is above the end"),
    ("a,b", None, "comma-separated integers"),
    (" , ", None, "names no layer"),
    ("3,3", None, "twice"),
    ("9", None, "out of range"),
    ("3", (2, 3), "not both"),
])
def test_bad_layer_specs_are_refused(adapter, layers, layer_range, match):
    with pytest.raises(ControlVectorError, match=match):
        parse_layers(make_vector(adapter), layers, layer_range)


def test_bad_coefficients_and_rows_are_refused(adapter, tmp_path):
    pv = make_vector(adapter)
    assert parse_layers(pv) == [3]  # the chosen layer
    with pytest.raises(ControlVectorError, match="not both"):
        choose_coefs(pv, [3], coef=1.0, alpha=1.0)
    with pytest.raises(ControlVectorError, match="non-zero"):
        choose_coefs(pv, [3], coef=0.0)
    with pytest.raises(ControlVectorError, match="resid_norm"):
        choose_coefs(PersonaVector(pv.vectors, None, pv.metadata), [3], alpha=1.0)
    with pytest.raises(ControlVectorError, match="layer 1 has no llama.cpp slot"):
        export_gguf(pv, tmp_path / "x.gguf", LayerChoice([1, 3], {1: 1.0, 3: 1.0}))
    assert not (tmp_path / "x.gguf").exists()


def _write(path, directions: dict, arch="controlvector", **kv):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_string("controlvector.model_hint", "qwen2")
    w.add_uint32("controlvector.layer_count", len(directions))
    for k, v in kv.items():
        w.add_string(k, v) if isinstance(v, str) else w.add_float32(k, v)
    for n, v in directions.items():
        w.add_tensor(f"direction.{n}", np.asarray(v, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_import_of_repeng_and_easysteer_files(adapter, repeng, tmp_path):
    d = adapter.hidden_size
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(d, generator=g).numpy(), torch.randn(d, generator=g).numpy()
    path = tmp_path / "happy.gguf"
    repeng.ControlVector(model_type="qwen2", directions={1: a, 3: b}).export_gguf(str(path))
    pv = import_gguf(path, adapter)
    assert pv.metadata["source"] == "repeng/llama.cpp control vector" and pv.trait == "happy"
    assert pv.metadata["control_rows"] == "[2, 4]" and pv.resid_norm is None
    np.testing.assert_allclose(pv.vector(2).numpy(), a)
    np.testing.assert_allclose(pv.vector(4).numpy(), b)
    assert pv.vectors["response_avg"][[0, 1, 3, 5]].abs().max() == 0
    assert pv.best_layer == (2 if np.linalg.norm(a) > np.linalg.norm(b) else 4)
    pv.check(adapter)  # usable by evaluate / monitor / screen

    es = _write(tmp_path / "es.gguf", {2: a}, **{"controlvector.method": "pca",
                                                  "controlvector.explained_variance.layer_2": 0.75})
    pe = import_gguf(es, adapter, trait="calm")
    assert pe.trait == "calm" and pe.metadata["source"] == "easysteer control vector"
    assert pe.metadata["cv_method"] == "pca"
    assert float(pe.metadata["cv_explained_variance_layer_2"]) == pytest.approx(0.75)
    np.testing.assert_allclose(pe.vector(3).numpy(), a)


def test_import_refuses_files_that_do_not_fit(adapter, tmp_path):
    d = adapter.hidden_size
    with pytest.raises(VectorMismatchError, match="hidden size"):
        import_gguf(_write(tmp_path / "w.gguf", {2: np.ones(d + 1)}), adapter)
    with pytest.raises(VectorMismatchError, match="only 5 blocks"):
        import_gguf(_write(tmp_path / "deep.gguf", {5: np.ones(d)}), adapter)
    with pytest.raises(ControlVectorError, match="not 'controlvector'"):
        import_gguf(_write(tmp_path / "m.gguf", {2: np.ones(d)}, arch="llama"), adapter)
    with pytest.raises(ControlVectorError, match="different lengths"):
        import_gguf(_write(tmp_path / "mix.gguf", {2: np.ones(d), 3: np.ones(d - 1)}), adapter)
    with pytest.raises(ControlVectorError, match="not a readable GGUF"):
        (tmp_path / "junk.gguf").write_text("nope")
        import_gguf(tmp_path / "junk.gguf", adapter)
    other, tok = tiny_pair("qwen2", num_hidden_layers=N_BLOCKS, intermediate_size=48)
    ours = export_gguf(make_vector(adapter), tmp_path / "o.gguf", LayerChoice([3], {3: 1.0})).path
    with pytest.raises(VectorMismatchError, match="config hash"):
        import_gguf(ours, ModelAdapter(other, tok))


def test_cli_export_and_import(adapter, tmp_path):
    model_dir = tmp_path / "model"
    adapter.model.save_pretrained(model_dir)
    adapter.tokenizer.save_pretrained(model_dir)
    pv = make_vector(adapter)
    pv.save(tmp_path / "evil.safetensors")
    runner = CliRunner()
    bad = runner.invoke(app, ["vector", "export", str(tmp_path / "evil.safetensors"), "--layers", "1",
                              "--out", str(tmp_path / "x.gguf")])
    assert bad.exit_code == 2 and "layer 1 cannot be exported" in bad.output
    ok = runner.invoke(app, ["vector", "export", str(tmp_path / "evil.safetensors"), "--layer-range", "3", "4",
                             "--coef", "-2", "--out", str(tmp_path / "evil.gguf")])
    assert ok.exit_code == 0, ok.output
    assert "--control-vector-layer-range 2 3" in ok.output and "every position" in ok.output
    imp = runner.invoke(app, ["vector", "import", str(tmp_path / "evil.gguf"), "--model", str(model_dir),
                              "--device", "cpu", "--out", str(tmp_path / "back.safetensors")])
    assert imp.exit_code == 0, imp.output
    clash = runner.invoke(app, ["vector", "import", str(tmp_path / "evil.gguf"), "--model", str(model_dir)])
    assert clash.exit_code == 2 and "already exists" in clash.output  # never overwrites the source vector
    back = load_vector(tmp_path / "back.safetensors")
    for row in (3, 4):
        torch.testing.assert_close(back.vector(row), pv.vector(row), rtol=1e-6, atol=1e-6)
