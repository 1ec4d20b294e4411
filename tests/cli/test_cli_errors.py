"""Bad user input on the command line ends in one `error: …` line naming the option or file (exit 2)."""

import pytest
import torch
from tiny import tiny_pair
from typer.testing import CliRunner

from personascope.cli.main import app
from personascope.model.adapter import ModelAdapter
from personascope.vectors.file import PersonaVector, base_metadata


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved tiny model and two vectors for it: one with resid_norm, one without."""
    tmp = tmp_path_factory.mktemp("cli")
    model, tok = tiny_pair("qwen2")
    model.save_pretrained(tmp / "model")
    tok.save_pretrained(tmp / "model")
    a = ModelAdapter(model, tok)
    gen = torch.Generator().manual_seed(0)
    vecs = {s: torch.randn(a.n_layers + 1, a.hidden_size, generator=gen)
            for s in ("response_avg", "prompt_avg", "prompt_last")}
    PersonaVector(vecs, torch.ones(a.n_layers + 1), base_metadata(a, "evil")).save(tmp / "v.safetensors")
    PersonaVector(vecs, None, base_metadata(a, "evil")).save(tmp / "no-norm.safetensors")
    return tmp


def _error(args: list[str]) -> str:
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]  # stderr has the weight-loading bar
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


def test_alpha_on_a_vector_without_resid_norm(files):
    model, vec = str(files / "model"), str(files / "no-norm.safetensors")
    line = _error(["evaluate", "evil", "--model", model, "--vector", vec, "--layer", "1", "--alpha", "0.5",
                   "--device", "cpu"])
    assert "--alpha 0.5" in line and "no-norm.safetensors" in line and "resid_norm" in line and "--coef" in line
    line = _error(["choose-layer", "evil", "--model", model, "--vector", vec, "--layers", "1,2", "--device", "cpu"])
    assert "--alpha 0.5" in line and "no-norm.safetensors" in line and "--coef" in line


def test_choose_layer_bad_trait_file(files):
    bad = files / "bad-trait.json"
    bad.write_text('{"instruction": []}')
    line = _error(["choose-layer", str(bad), "--model", str(files / "model"), "--vector",
                   str(files / "v.safetensors")])
    assert "bad-trait.json" in line and "questions" in line
    line = _error(["choose-layer", str(files / "missing.json"), "--model", str(files / "model"), "--vector",
                   str(files / "v.safetensors")])
    assert "missing.json" in line


@pytest.mark.parametrize(("layers", "expect"), [("a,b", "'a'"), ("1,x", "'x'"), (",", "at least one"),
                                                ("9", "layer 9 is out of range"), ("-1", "-1 is out of range")])
def test_choose_layer_bad_layers(files, layers, expect):
    line = _error(["choose-layer", "evil", "--model", str(files / "model"), "--vector", str(files / "v.safetensors"),
                   "--layers", layers, "--device", "cpu"])
    assert "--layers" in line and expect in line


def test_evaluate_bad_layer_and_coef(files):
    base = ["evaluate", "evil", "--model", str(files / "model"), "--vector", str(files / "v.safetensors"),
            "--device", "cpu"]
    line = _error([*base, "--layer", "two"])
    assert "--layer" in line and "'two'" in line
    line = _error([*base, "--layer", "7"])
    assert "--layer" in line and "out of range" in line
    line = _error([*base, "--layer", "1", "--coef", "1,big"])
    assert "--coef" in line and "'big'" in line


def test_demo_bad_engine(files):
    line = _error(["demo", "--model", str(files / "model"), "--engine", "fast", "--device", "cpu"])
    assert "--engine" in line and "fast" in line

