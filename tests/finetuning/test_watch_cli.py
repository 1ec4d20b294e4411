import json

import pytest
import torch
from tiny import tiny_pair
from typer.testing import CliRunner

from personascope.cli.main import app
from personascope.finetuning.datasets import chat_row
from personascope.model.adapter import ModelAdapter
from personascope.vectors.file import PersonaVector, base_metadata


def _setup(tmp_path, **overrides):
    model, tok = tiny_pair("qwen2", seed=6, **overrides)
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    a = ModelAdapter(model, tok)
    for i, trait in enumerate(("optimistic", "humorous")):
        v = torch.randn(a.n_layers + 1, a.hidden_size, generator=torch.Generator().manual_seed(i))
        PersonaVector({"response_avg": v}, torch.ones(a.n_layers + 1), base_metadata(a, trait)
                      ).with_metadata(best_layer=2).save(tmp_path / f"{trait}.safetensors")
    rows = [chat_row(f"question {i}?", f"answer {i}, and so on.") for i in range(8)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(tmp_path / "base")


def _run(tmp_path, base, *extra):
    return CliRunner().invoke(app, ["finetune", str(tmp_path / "d.jsonl"), "--model", base, "--out",
                                    str(tmp_path / "ad"), "--epochs", "2", "--batch-size", "2", "--lr", "0.01",
                                    "--watch-questions", "2", *extra])


def test_finetune_watch_vector_logs_and_steers_and_shift_plots_it(tmp_path):
    base = _setup(tmp_path)
    r = _run(tmp_path, base, "--watch-vector", str(tmp_path / "optimistic.safetensors"), "--watch-vector",
             str(tmp_path / "humorous.safetensors"), "--steer-above", "humorous=-1000", "--steer-above-coef", "2")
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "persona shift at the end of training: optimistic" in text and "steer_above fired at step 0" in text
    lines = (tmp_path / "ad" / "persona_shift.jsonl").read_text().splitlines()
    assert len(lines) == 10  # steps 0..8 and the steer event
    meta = json.loads((tmp_path / "ad" / "personascope_finetune.json").read_text())
    assert meta["persona_shift"]["events"][0]["coef"] == 2.0
    r = CliRunner().invoke(app, ["shift", "--base", base, "--finetuned", str(tmp_path / "ad"), "--vector",
                                 str(tmp_path / "optimistic.safetensors"), "--questions", "2", "--no-judge",
                                 "--no-capability", "--out", str(tmp_path / "shift")])
    assert r.exit_code == 0, r.output
    assert "logged during training: optimistic" in " ".join(r.output.split())
    assert (tmp_path / "shift" / "shift_trajectory.png").stat().st_size > 1000


@pytest.mark.parametrize("case", ["other_model", "too_long", "unwatched", "bad_rule", "no_watch"])
def test_bad_watch_input_is_one_error_line_and_nothing_written(tmp_path, case):
    base = _setup(tmp_path, max_position_embeddings=40 if case == "too_long" else 256)
    vec = str(tmp_path / "optimistic.safetensors")
    args = {"other_model": ["--watch-vector", str(tmp_path / "other.safetensors")],
            "too_long": ["--watch-vector", vec],
            "unwatched": ["--watch-vector", vec, "--stop-above", "humorous=1"],
            "bad_rule": ["--watch-vector", vec, "--stop-above", "optimistic"],
            "no_watch": ["--stop-above", "optimistic=1"]}[case]
    if case == "other_model":
        o = ModelAdapter(*tiny_pair("qwen2", hidden_size=16, intermediate_size=32))
        PersonaVector({"response_avg": torch.ones(o.n_layers + 1, 16)}, None, base_metadata(o, "optimistic")
                      ).save(tmp_path / "other.safetensors")
    r = _run(tmp_path, base, *args)
    assert r.exit_code == 2, r.output
    assert r.output.count("error:") == 1, r.output  # (besides the error only the weight loader's progress bar)
    errors = ["error:" + r.output.split("error:")[1].strip()]
    assert "\n" not in errors[0], r.output
    want = {"other_model": "hidden size 16", "too_long": "takes at most 40",
            "unwatched": "names 'humorous', which is not watched", "bad_rule": "expected NAME=THRESHOLD",
            "no_watch": "need --watch-vector"}[case]
    assert want in errors[0]
    assert not (tmp_path / "ad").exists()
