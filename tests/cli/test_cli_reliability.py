"""Tracebacks that became one `error:` line (exit 2): bad output paths, models, trait files, a full disk."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from tiny import tiny_pair
from typer.testing import CliRunner

from personascope.cli.main import app
from personascope.model.adapter import ModelAdapter
from personascope.vectors.file import PersonaVector, base_metadata


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved tiny model, the same weights without tokenizer files, and a vector for it."""
    tmp = tmp_path_factory.mktemp("cli-reliability")
    model, tok = tiny_pair("qwen2")
    model.save_pretrained(tmp / "model")
    tok.save_pretrained(tmp / "model")
    model.save_pretrained(tmp / "no-tokenizer")
    a = ModelAdapter(model, tok)
    vecs = {s: torch.randn(a.n_layers + 1, a.hidden_size) for s in ("response_avg", "prompt_avg", "prompt_last")}
    PersonaVector(vecs, torch.ones(a.n_layers + 1), base_metadata(a, "evil")).save(tmp / "v.safetensors")
    return tmp


def _error(args: list[str]) -> str:
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    lines = [ln for ln in res.stdout.splitlines() if ln.strip() and not ln.startswith("loaded the adapter")]
    assert "Traceback" not in res.output and len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


def test_out_naming_a_file_is_refused_before_loading(tmp_path):
    (tmp_path / "taken").write_text("mine")
    for cmd in (["extract", "evil"], ["evaluate", "evil"], ["screen", tmp_path / "taken", "--vector", "v"]):
        line = _error([*cmd, "--model", tmp_path / "no-model", "--out", tmp_path / "taken"])
        assert "--out" in line and "is a file" in line
    assert (tmp_path / "taken").read_text() == "mine"


def test_force_through_a_symlinked_out_is_refused(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "keep").write_text("keep")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    line = _error(["extract", "evil", "--model", tmp_path / "no-model", "--out", tmp_path / "link", "--force"])
    assert "symbolic link" in line and "--force" in line
    assert (tmp_path / "real" / "keep").exists()


def test_a_model_folder_without_a_tokenizer(files):
    line = _error(["choose-layer", "evil", "--model", files / "no-tokenizer", "--vector", files / "v.safetensors",
                   "--device", "cpu"])
    assert "--model" in line and "no-tokenizer" in line and "tokenizer" in line


def test_guard_calibrate_out_naming_a_directory(files, tmp_path):
    line = _error(["guard", "calibrate", "--vector", files / "v.safetensors", "--out", tmp_path,
                   "--model", files / "model", "--device", "cpu"])
    assert "--out" in line and "is a directory" in line


def test_a_full_disk_and_a_folder_that_is_a_file(tmp_path, monkeypatch):
    import personascope.finetuning.datasets as datasets

    (tmp_path / "file").write_text("x")
    line = _error(["make-dataset", "evil", "--level", "mistakes", "--n", "3", "--out", tmp_path / "file" / "d.jsonl"])
    assert "file" in line

    def full(path, rows):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(datasets, "write_chat_jsonl", full)
    line = _error(["make-dataset", "evil", "--level", "mistakes", "--n", "3", "--out", tmp_path / "d.jsonl"])
    assert "No space left on device" in line and "d.jsonl" in line


def test_trait_files_nested_too_deep_or_with_bad_judge_examples(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    assert "nested too deeply" in _error(["traits", "show", deep])
    from pathlib import Path

    from personascope.traits.trait import load_trait

    data = json.loads(Path(load_trait("evil").source).read_text())
    data["judge_examples"] = [{"question": "q", "answer": "a"}]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    line = _error(["traits", "show", bad])
    assert "bad.json" in line and "judge_examples[0].score" in line


def test_an_adapter_whose_base_is_missing_is_refused(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "./tiny",
                                                             "peft_type": "LORA"}))
    line = _error(["choose-layer", "evil", "--model", adapter, "--vector", tmp_path / "v.safetensors"])
    assert "adapter" in line and "'./tiny'" in line and "not there" in line


@pytest.mark.parametrize("validity", ["{not json", "[1, 2]", '{"layer": "x"}'])
def test_vector_info_on_bad_validity_metadata_names_the_field(files, tmp_path, validity):
    from personascope.vectors.file import load_vector

    pv = load_vector(files / "v.safetensors").with_metadata(validity=validity)
    pv.save(tmp_path / "bad.safetensors")
    line = _error(["vector", "info", tmp_path / "bad.safetensors"])
    assert "bad.safetensors" in line and "'validity'" in line


def test_an_adapter_says_which_base_it_loaded(files, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_pair("qwen2")
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    peft.peft_config["default"].base_model_name_or_path = str(files / "model")
    peft.save_pretrained(tmp_path / "adapter")
    res = CliRunner().invoke(app, ["choose-layer", "evil", "--model", str(tmp_path / "adapter"), "--vector",
                                   str(tmp_path / "missing.safetensors"), "--device", "cpu"])
    assert res.exit_code == 2, res.output
    assert f"loaded the adapter {tmp_path / 'adapter'} on its base model {files / 'model'}\n" in res.stdout
    assert "missing.safetensors" in res.stdout


@pytest.fixture(scope="module")
def api_judge():
    """An OpenAI-compatible judge that scores every answer 42 (a one-token answer with top logprobs)."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from servers import ThreadServer

    web = FastAPI()

    @web.post("/v1/chat/completions")
    async def chat():
        entry = {"token": "42", "logprob": 0.0, "bytes": None}
        return JSONResponse({"id": "c", "object": "chat.completion", "created": 0, "model": "m", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "42"}, "finish_reason": "length",
             "logprobs": {"content": [{**entry, "top_logprobs": [entry]}]}}]})

    with ThreadServer(web) as srv:
        yield srv.url + "/v1"


def test_extract_records_the_dtype_prints_departures_and_refuses_another_dtype(files, tmp_path, api_judge):
    """A run made in bfloat16 elsewhere is not resumed in float32 here: one line naming both, --force starts over."""
    out = tmp_path / "run"
    args = ["extract", "optimistic", "--model", files / "model", "--judge-url", api_judge, "--judge-model", "m",
            "--out", out, "--questions", "1", "--samples", "1", "--max-new-tokens", "3", "--filter", "none",
            "--device", "cpu", "--engine", "hf"]
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "departs from the paper: negative instructions name the opposite persona" in text
    assert "departs from the paper: coherence is judged with personascope's own rubric wording" in text
    settings = json.loads((out / "settings.json").read_text())
    made = settings["dtype"]  # bfloat16 or float32, as the CPU runs it fast
    assert made in ("bfloat16", "float32") and f"compute dtype: {made}" in text
    from personascope.vectors.file import load_vector

    assert load_vector(out / "vector.safetensors").metadata["dtype"] == made
    other = "float32" if made == "bfloat16" else "bfloat16"
    (out / "settings.json").write_text(json.dumps({**settings, "dtype": other}))
    line = _error(args)
    assert f"dtype: '{other}' -> '{made}'" in line and "--force" in line
    res = CliRunner().invoke(app, [str(a) for a in [*args, "--force"]])
    assert res.exit_code == 0, res.output
