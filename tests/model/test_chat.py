import json

import pytest
from tiny import tiny_pair

from personascope.model.adapter import ModelAdapter
from personascope.model.chat import ChatError, DatasetError, check_messages, load_chat_jsonl, merge_system
from personascope.screen.score import BadRow, Row, parse_record
from personascope.serve import ApiError, Engine

U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "hello"}
S = {"role": "system", "content": "be brief"}
BAD = {
    "mid-system": [U, A, S, U, A],
    "tool": [U, {"role": "tool", "content": "42"}, A],
    "no-user": [S, A],
    "no-answer": [U],
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_one_validator_screen_and_finetune_agree(kind, tmp_path):
    msgs = BAD[kind]
    row = parse_record({"messages": msgs}, 3)
    assert isinstance(row, BadRow) and row.line == 3
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": [U, A]}) + "\n" + json.dumps({"messages": msgs}) + "\n")
    with pytest.raises(DatasetError, match=f"{path}:2: malformed chat row"):
        load_chat_jsonl(path)


def test_rows_screen_accepts_are_rows_finetune_accepts(tmp_path):
    good = [[U, A], [S, U, A], [U, A, U, A]]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in good))
    assert all(isinstance(parse_record({"messages": m}, 1), Row) for m in good)
    assert load_chat_jsonl(path) == good


def test_server_rejects_the_same_conversations():
    engine = Engine(ModelAdapter(*tiny_pair("qwen2")))
    with pytest.raises(ApiError) as e:
        engine.render([U, A, S, U])
    assert e.value.param == "messages[2].role" and "system" in e.value.message
    with pytest.raises(ApiError) as e:
        engine.render([U, {"role": "tool", "content": "x"}, U])
    assert e.value.param == "messages[1].role"
    text = engine.render([{"role": "developer", "content": "SYS"}, U])
    assert text == engine.adapter.render([{"role": "system", "content": "SYS"}, U])


def test_system_merged_once_into_first_user_turn():
    msgs = check_messages([S, U, A, U], answer=False)
    assert merge_system(msgs, True) == msgs
    merged = merge_system(msgs, False)
    assert [m["role"] for m in merged] == ["user", "assistant", "user"]
    assert merged[0]["content"] == "be brief\n\nhi" and msgs[1]["content"] == "hi"  # input not mutated
    a = ModelAdapter(*tiny_pair("gemma2"))
    assert a.render(msgs) == a.render(merged) and "be brief\n\nhi" in a.render(msgs)
    with pytest.raises(ChatError, match=r"messages\[1\]"):
        check_messages([U, {"role": "user"}], answer=False)
