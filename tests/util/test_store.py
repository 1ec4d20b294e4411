"""Run records on disk: torn writes, non-finite numbers, the one JSONL reader, links out of a run folder."""

from __future__ import annotations

import json

import pytest

from personascope.util import JsonlStore, bind_run, iter_json_lines, read_jsonl, write_json
from personascope.util.store import RunSettingsError

KEY = ("side", "question")


def _line(q: int, answer: str = "fine") -> bytes:
    return (json.dumps({"side": "pos", "question": q, "answer": answer}, ensure_ascii=False) + "\n").encode()


def test_a_tail_torn_inside_a_utf8_character_is_dropped_and_the_run_resumes(tmp_path, caplog):
    path = tmp_path / "answers.jsonl"
    torn = _line(2, "é" * 20)
    cut = torn[: torn.index("é".encode()) + 1]  # ends inside a two-byte character
    path.write_bytes(_line(0) + _line(1, "naïve") + cut)
    with pytest.raises(UnicodeDecodeError):
        cut.decode("utf-8")
    store = JsonlStore(path, KEY)
    assert sorted(store.records) == [("pos", 0), ("pos", 1)]
    assert path.read_bytes() == _line(0) + _line(1, "naïve")  # the torn line is gone, the rest untouched
    assert "torn last line" in caplog.text
    store.append([{"side": "pos", "question": 2, "answer": "é"}])
    assert [r["question"] for r in read_jsonl(path)] == [0, 1, 2]


def test_a_whole_last_record_without_its_newline_is_kept(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_bytes(_line(0) + _line(1)[:-1])
    store = JsonlStore(path, KEY)
    assert len(store) == 2
    store.append([{"side": "pos", "question": 3}])
    assert [r["question"] for r in read_jsonl(path)] == [0, 1, 3]


def test_an_undecodable_middle_line_is_skipped_not_fatal(tmp_path, caplog):
    path = tmp_path / "s.jsonl"
    path.write_bytes(_line(0) + b'{"side": "pos", "question": 1, "answer": "\xff"}\n' + _line(2))
    assert [r["question"] for r in read_jsonl(path)] == [0, 2]
    assert "not UTF-8" in caplog.text


def test_non_finite_numbers_are_written_as_null_and_read_as_missing(tmp_path):
    path = tmp_path / "scores.jsonl"
    store = JsonlStore(path, KEY)
    store.append([{"side": "pos", "question": 0, "score": float("nan"), "extra": [float("inf"), 1.5]}])
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    rec = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in the file"))
    assert rec["score"] is None and rec["extra"] == [None, 1.5]
    assert store.get(("pos", 0))["score"] is None
    path.write_text('{"side": "pos", "question": 1, "score": NaN}\n')  # a file from before: NaN reads as missing
    assert JsonlStore(path, KEY).get(("pos", 1))["score"] is None
    write_json(tmp_path / "summary.json", {"mean": float("nan")})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"mean": None}


def test_one_reader_bom_line_separators_and_errors(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"t": "a\u2028b"}, {"t": "c\u0085d\re"}, {"t": "last"}]
    body = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode()
    deep = b"[" * 100_000 + b"]" * 100_000
    path.write_bytes(b"\xef\xbb\xbf" + body + b"\r\n" + b"\xff\xfe\n" + deep + b"\n\n{bad\n")
    got = list(iter_json_lines(path))
    assert [g.value for g in got[:3]] == rows  # row 1 despite the BOM; U+2028, U+0085 and \r stay inside rows
    assert [g.line for g in got] == [1, 2, 3, 4, 5, 7]
    assert got[3].error.startswith("not UTF-8")
    assert got[4].error == "JSON nested too deeply"
    assert got[5].error.startswith("bad JSON")


def test_a_link_out_of_the_run_folder_is_refused(tmp_path):
    run, outside = tmp_path / "run", tmp_path / "elsewhere.jsonl"
    run.mkdir()
    outside.write_text("")
    (run / "inside.jsonl").write_text("")
    (run / "ok.jsonl").symlink_to(run / "inside.jsonl")  # a link inside the folder is fine
    bind_run(run, {"a": 1})
    (run / "answers.jsonl").symlink_to(outside)
    with pytest.raises(RunSettingsError, match="answers.jsonl is a symbolic link to .*elsewhere.jsonl, outside"):
        bind_run(run, {"a": 1})
    assert outside.read_text() == ""


def test_a_resume_under_another_dtype_is_refused_naming_both(tmp_path):
    bind_run(tmp_path, {"model": "m", "dtype": "bfloat16"})
    with pytest.raises(RunSettingsError) as e:
        bind_run(tmp_path, {"model": "m", "dtype": "float32"})
    msg = str(e.value)
    assert "dtype: 'bfloat16' -> 'float32'" in msg and "--force" in msg and "\n" not in msg
    bind_run(tmp_path, {"model": "m", "dtype": "float32"}, force=True)
    assert json.loads((tmp_path / "settings.json").read_text())["dtype"] == "float32"
