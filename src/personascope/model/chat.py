"""Chat rows: the one validator every reader of chat messages uses (screen, datasets, finetune, serve).

A conversation is a list of `{"role", "content"}` messages with roles `system`, `user` and
`assistant`; a system message may only come first (it is merged into the first user turn for
templates without a system role), and there is at least one user message. A training or
screening row also ends with the assistant's turn (the answer). Anything else, such as a `tool`
role or a system message mid-conversation, is rejected the same way everywhere.
"""

from __future__ import annotations

from pathlib import Path

from personascope.util import iter_json_lines

ROLES = ("system", "user", "assistant")


class ChatError(ValueError):
    """A chat conversation that personascope does not accept; the message says which message and why."""

    def __init__(self, message: str, where: str | None = None):
        super().__init__(message)
        self.where = where  # e.g. "messages[2].role": the offending field, when there is one


class DatasetError(ChatError):
    """A chat dataset file is malformed or missing (the message names the file and line)."""


def check_messages(messages: object, answer: bool = True, where: str = "messages") -> list[dict]:
    """Validated copies of chat messages (`role`, `content` only); with `answer`, the last turn is the assistant's.

    Raises ChatError naming the first offending message, as `where[i]`.
    """
    if not isinstance(messages, list):
        raise ChatError(f"'{where}' is not a list of {{role, content}} objects", where)
    if not messages:
        raise ChatError(f"empty {where}", where)
    out: list[dict] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ChatError(f"{where}[{i}] is not an object with a string 'role' and 'content'", f"{where}[{i}]")
        if not is_text(m["content"]):
            raise ChatError(f"{where}[{i}].content holds a lone surrogate (e.g. \\ud800), which is not text",
                            f"{where}[{i}].content")
        role = m.get("role")
        if role not in ROLES:
            raise ChatError(f"{where}[{i}].role {role!r} is not supported (roles: {', '.join(ROLES)})",
                            f"{where}[{i}].role")
        if role == "system" and i != 0:
            raise ChatError(f"{where}[{i}] is a system message after the start; a system message may only come first",
                            f"{where}[{i}].role")
        out.append({"role": role, "content": m["content"]})
    if answer:
        if out[-1]["role"] != "assistant":
            raise ChatError(f"no assistant turn at the end of {where} (last role is {out[-1]['role']!r})", where)
        if not out[-1]["content"].strip():
            raise ChatError(f"empty assistant response ({where}[{len(out) - 1}])", where)
    if not any(m["role"] == "user" for m in out):
        raise ChatError(f"no user turn in {where}", where)
    return out


def is_text(s: str) -> bool:
    """Whether `s` can be written as UTF-8 (JSON's "\\ud800" escapes decode to lone surrogates, which cannot)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_row(row: object) -> list[dict]:
    """The validated messages of a chat row `{"messages": [...]}` ending with the assistant's answer."""
    if not isinstance(row, dict) or "messages" not in row:
        raise ChatError('expected a JSON object with a "messages" list')
    return check_messages(row["messages"], answer=True)


def merge_system(messages: list[dict], supports_system: bool) -> list[dict]:
    """Messages for a template: a leading system message is kept, or folded into the first user turn."""
    if supports_system or not messages or messages[0]["role"] != "system":
        return list(messages)
    system, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
    first = next((m for m in rest if m["role"] == "user"), None)
    if first is None:
        raise ChatError("a system message needs a user message after it")
    first["content"] = f"{system}\n\n{first['content']}"
    return rest


def split_answer(messages: list[dict]) -> tuple[list[dict], str]:
    """The prompt turns and the final assistant answer of a validated row."""
    return messages[:-1], messages[-1]["content"]


def question_of(messages: list[dict]) -> str:
    """The last user turn (what a judge sees as the question)."""
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")


MAX_ROW_BYTES = 1_000_000  # a data row longer than this is refused (screening skips it) before tokenising


def load_chat_jsonl(path: str | Path) -> list[list[dict]]:
    """Every row's validated messages; a malformed row raises DatasetError naming its file and line."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset {path} does not exist")
    if path.is_dir():
        raise DatasetError(f"dataset {path} is a directory, not a JSONL file")
    rows = []
    for rec in iter_json_lines(path, MAX_ROW_BYTES):  # the reader screen uses too (BOM, U+2028 and U+0085)
        if rec.error is not None and rec.error.startswith("not UTF-8"):
            raise DatasetError(f"{path}:{rec.line}: {rec.error}; save the file as UTF-8")
        if rec.error is not None and rec.error.startswith("the row is"):
            raise DatasetError(f"{path}:{rec.line}: {rec.error}")
        try:
            if rec.error is not None:
                raise ChatError(rec.error)
            rows.append(check_row(rec.value))
        except ChatError as e:
            raise DatasetError(f"{path}:{rec.line}: malformed chat row ({e})") from None
    if not rows:
        raise DatasetError(f"dataset {path} has no rows")
    return rows
