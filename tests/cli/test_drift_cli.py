"""`personascope drift` on a saved tiny model: skipped lines by number, calibration on the fly, resume, errors."""

import json

import pytest
import torch
from tiny import tiny_pair
from typer.testing import CliRunner

from personascope.cli.main import app
from personascope.model.adapter import ModelAdapter
from personascope.vectors.file import PersonaVector, base_metadata

CONV = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
        {"role": "user", "content": "more?"}, {"role": "assistant", "content": "sure, more"}]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("drift")
    model, tok = tiny_pair("qwen2")
    model.save_pretrained(tmp / "model")
    tok.save_pretrained(tmp / "model")
    a = ModelAdapter(model, tok)
    v = torch.randn(a.n_layers + 1, a.hidden_size, generator=torch.Generator().manual_seed(0))
    PersonaVector({"response_avg": v}, torch.ones(a.n_layers + 1), base_metadata(a, "evil", best_layer="2")
                  ).save(tmp / "v.safetensors")
    rows = [json.dumps({"id": f"c{i}", "messages": CONV[: 2 + 2 * (i % 2)]}) for i in range(4)]
    (tmp / "convs.jsonl").write_text("\n".join([rows[0], "{oops", *rows[1:]]) + "\n")
    return tmp


def test_drift_command_runs_resumes_and_reports(files):
    out = files / "run"
    args = ["drift", str(files / "convs.jsonl"), "--vector", str(files / "v.safetensors"), "--model",
            str(files / "model"), "--out", str(out), "--calibrate", "3", "--z", "-50", "--turns", "1"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "convs.jsonl:2" in res.output and "4 conversations, 6 turns" in res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["flagged"]["evil"]["n"] == 4 and summary["calibrated"]["evil"]
    assert summary["skipped_lines"][0]["line"] == 2
    turns = [json.loads(x) for x in (out / "turns.jsonl").read_text().splitlines()]
    assert all(t["pre_z"]["evil"] is not None for t in turns)
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "4 conversations" in again.output


@pytest.mark.parametrize("extra,expect", [
    (["--vector", "no-such-vector"], "no-such-vector"),
    (["--vector", "V", "--turns", "0"], "--turns"),
    (["--vector", "V", "--span", "tokens"], "--span"),
    (["--vector", "V", "--layer", "99"], "layer 99"),
])
def test_drift_bad_input_is_one_line(files, extra, expect):
    extra = [str(files / "v.safetensors") if x == "V" else x for x in extra]
    res = CliRunner().invoke(app, ["drift", str(files / "convs.jsonl"), "--model", str(files / "model"),
                                   "--out", str(files / "bad"), *extra])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], res.output
