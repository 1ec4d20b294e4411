"""Every numeric option of every command × {0, −1, nan, inf, huge}: a refused value ends in exit 2, one
`error:` line naming the option, and nothing written (it is checked before any model or file is touched)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from personascope.cli.main import app

# the commands attached by commands/serve.py (`serve`, `traits new`) are swept by the server's own tests
OTHERS = {"serve", "traits new"}

# the arguments each command needs besides the option under test (files that need not exist: nothing is read)
BASE = {
    "extract": ["evil"],
    "evaluate": ["evil", "--vector", "v.safetensors"],
    "choose-layer": ["evil", "--vector", "v.safetensors"],
    "judge-eval": [],
    "demo": [],
    "monitor": ["evil", "--vector", "v.safetensors"],
    "watch": ["--vector", "v.safetensors"],
    "make-dataset": ["evil"],
    "finetune": ["data.jsonl"],
    "shift": ["--vector", "v.safetensors", "--finetuned", "adapter"],
    "screen": ["data.jsonl", "--vector", "v.safetensors"],
    "vector export": ["v.safetensors", "--out", "out.gguf"],
    "guard calibrate": ["--vector", "v.safetensors", "--out", "out.safetensors"],
    "drift": ["data.jsonl", "--vector", "v.safetensors"],
}

# numeric options typed as text (lists parsed by the command), which introspection cannot find
TEXT_NUMBERS = {("evaluate", "--layer"), ("evaluate", "--coef"), ("evaluate", "--alpha"),
                ("choose-layer", "--layers"), ("monitor", "--shots"), ("vector export", "--layers")}

# which of the swept values are meaningful (the rest must be refused); this table is the specification
ZERO_OK = {"--seed", "--temperature", "--layer", "--layers", "--steer-layer", "--coef", "--alpha", "--steer-coef",
           "--steer-alpha", "--guard-coef", "--threshold", "--percentile", "--shot-chars", "--shots",
           "--pos-threshold", "--neg-threshold", "--coherence-threshold", "--margin", "--trait-threshold",
           "--min-coherence", "--max-coherence-drop", "--layer-range", "--calibrate", "--z", "--steer-above-alpha",
           "--steer-above-coef"}
NEG_OK = {"--coef", "--alpha", "--steer-coef", "--steer-alpha", "--guard-coef", "--threshold", "--z",
          "--steer-above-alpha", "--steer-above-coef"}
VALUES = ("0", "-1", "nan", "inf", "huge")
HUGE = {"int": str(2**70), "float": "1e300"}


def numeric_options() -> list[tuple[str, str, str, int]]:
    """(command path, option, int/float, nargs) for every numeric option the app declares."""
    found = []

    def walk(cmd, path: list[str]) -> None:
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                walk(sub, [*path, name])
            return
        name = " ".join(path)
        if name in OTHERS:
            return
        for p in cmd.params:
            kind = p.bare_type()
            if kind in ("int", "float", "tuple[int, int]", "tuple[float, float]"):
                found.append((name, p.opts[0], "float" if "float" in kind else "int", p.nargs))
    walk(typer.main.get_command(app), [])
    return found + [(c, o, "int" if o in ("--layer", "--layers", "--shots") else "float", 1) for c, o in TEXT_NUMBERS]


OPTIONS = numeric_options()
COMMAND = typer.main.get_command(app)  # built once: building it is most of an invocation's time


@pytest.fixture(autouse=True)
def _prebuilt(monkeypatch):
    monkeypatch.setattr("typer.testing._get_command", lambda a: COMMAND if a is app else typer.main.get_command(a))
CASES = [(c, o, kind, n, v) for c, o, kind, n in OPTIONS for v in VALUES
         if not (v == "0" and o in ZERO_OK) and not (v == "-1" and o in NEG_OK)]


def model_args(command: str, tmp_path: Path) -> list[str]:
    """A model that does not exist: a check after loading would fail on it, not on the option."""
    option = {"judge-eval": "--judge-model", "shift": "--base", "vector export": "--model"}.get(command, "--model")
    return [option, os.fspath(tmp_path / "no-model")]


def test_every_command_is_swept():
    commands = {c for c, *_ in OPTIONS}
    assert commands == set(BASE), "add the new command's required arguments to BASE"
    assert len(OPTIONS) > 80


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize(("command", "option", "kind", "nargs", "value"), CASES,
                         ids=[f"{c}{o}={v}" for c, o, _, _, v in CASES])
def test_refused_before_anything_is_written(tmp_path, monkeypatch, command, option, kind, nargs, value):
    monkeypatch.chdir(tmp_path)
    before = _files(tmp_path)
    text = HUGE[kind] if value == "huge" else value
    given = [option, "1", text] if nargs == 2 else [f"{option}={text}"]  # --layer-range A B: bad second bound
    args = [*command.split(), *BASE[command], *model_args(command, tmp_path), *given]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, (args, res.output)
    assert "Traceback" not in res.output and (res.exception is None or isinstance(res.exception, SystemExit))
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert option in lines[0], lines[0]  # refused for the option, not for the missing model
    assert _files(tmp_path) == before


@pytest.mark.parametrize(("command", "option", "value"), [
    ("extract", "--samples", "3"), ("extract", "--top-p", "1"), ("extract", "--seed", "4294967295"),
    ("evaluate", "--coef", "-2,0,2"), ("screen", "--percentile", "95"), ("guard calibrate", "--percentile", "50"),
    ("finetune", "--lr", "1e-5"), ("monitor", "--shots", "0,5")])
def test_values_in_range_pass_the_check(tmp_path, monkeypatch, command, option, value):
    """A good value gets past parsing (the command then fails later, on the missing model or file)."""
    monkeypatch.chdir(tmp_path)
    args = [*command.split(), *BASE[command], *model_args(command, tmp_path), f"{option}={value}"]
    res = CliRunner().invoke(app, args)
    assert "out of range" not in res.output and "must be a finite" not in res.output, res.output
