"""One JSONL reader for chat data: `finetune` (load_chat_jsonl) and `screen` (read_rows) accept the same rows."""

from __future__ import annotations

import json

import pytest

from personascope.model.chat import DatasetError, check_messages, load_chat_jsonl
from personascope.screen.score import BadRow, Row, read_rows


def _row(user: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def test_bom_and_unicode_line_separators_read_the_same_in_finetune_and_screen(tmp_path):
    rows = [_row("First\u2028question", "An\u0085answer"), _row("Second", "Line\u2029two\rthree")]
    path = tmp_path / "chat.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode() + b"\n")
    chats = load_chat_jsonl(path)
    assert [c[-1]["content"] for c in chats] == ["An\u0085answer", "Line\u2029two\rthree"]
    screened = list(read_rows(path))
    assert all(isinstance(r, Row) for r in screened) and [r.line for r in screened] == [1, 2]
    assert [r.response for r in screened] == [c[-1]["content"] for c in chats]  # row 1 not dropped for its BOM


def test_a_lone_surrogate_is_refused_naming_the_message(tmp_path):
    with pytest.raises(ValueError, match=r"messages\[1\]\.content holds a lone surrogate"):
        check_messages([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a\ud800b"}])
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(_row("ok", "fine")) + "\n" + '{"messages": [{"role": "user", "content": "\\ud800"}, '
                    '{"role": "assistant", "content": "x"}]}\n' + '{"prompt": "p\\udfff", "response": "r"}\n')
    with pytest.raises(DatasetError, match=r"chat.jsonl:2: .*lone surrogate"):
        load_chat_jsonl(path)
    rows = list(read_rows(path))
    assert isinstance(rows[0], Row) and isinstance(rows[1], BadRow) and isinstance(rows[2], BadRow)
    assert "surrogate" in rows[1].error and "surrogate" in rows[2].error


def test_json_nested_too_deeply_is_one_error(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text('{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(DatasetError, match=r"deep.jsonl:1: .*nested too deeply"):
        load_chat_jsonl(path)
    (bad,) = read_rows(path)
    assert isinstance(bad, BadRow) and "nested too deeply" in bad.error


def test_a_csv_with_a_bom_keeps_its_prompt_column(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_bytes(b"\xef\xbb\xbfprompt,response\nHi?,Hello.\n")
    (row,) = read_rows(path)
    assert isinstance(row, Row) and row.response == "Hello."
