"""Finetuning settings that would train nothing or crash mid-run are refused before training; adapters record a
base model that loads from any working directory."""

from __future__ import annotations

import pytest

from personascope.finetuning.train import profile, stored_base


@pytest.mark.parametrize(("field", "value"), [("epochs", 0), ("batch_size", -3), ("grad_accum", 0), ("r", 0),
                                              ("alpha", 0), ("max_len", 0), ("max_steps", 0),
                                              ("lr", float("nan")), ("lr", 0.0), ("lr", float("inf")),
                                              ("seed", 2**70), ("seed", -1)])
def test_nonsense_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        profile("quick", **{field: value})


def test_the_base_is_stored_as_an_absolute_path(tmp_path, monkeypatch):
    (tmp_path / "tiny").mkdir()
    monkeypatch.chdir(tmp_path)
    assert stored_base("./tiny") == str((tmp_path / "tiny").resolve())
    assert stored_base("qwen2.5-coder-0.5b") == "qwen2.5-coder-0.5b"  # a built-in stays a name
    assert stored_base("org/model-on-the-hub") == "org/model-on-the-hub"
