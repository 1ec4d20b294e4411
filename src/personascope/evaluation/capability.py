"""Capability check: multiple-choice accuracy from the next-token distribution over option letters.

The shipped set (`data/capability/general.jsonl`, written for personascope) and any MMLU-style
JSONL file (`question`, `choices` [4], `answer` letter or index) work the same way, with or
without steering, so a trait fix that wrecks the model is visible.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from personascope.model import ModelAdapter, pad_batch, pad_id, position_ids_for

LETTERS = "ABCD"


@dataclass
class CapabilityResult:
    accuracy: float
    n: int
    source: str


def load_mc(path: str | Path | None = None) -> list[dict]:
    """Multiple-choice rows; a malformed line is named with its number."""
    p = Path(path) if path else Path(str(resources.files("personascope") / "data" / "capability" / "general.jsonl"))
    rows = []
    for lineno, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            ans = r["answer"]
            idx = LETTERS.index(ans) if isinstance(ans, str) else int(ans)
            if len(r["choices"]) != 4 or not 0 <= idx < 4:
                raise ValueError("needs 4 choices and an answer A-D")
        except (json.JSONDecodeError, KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{p}:{lineno}: malformed multiple-choice row ({e})") from None
        rows.append({"question": r["question"], "choices": r["choices"], "answer": idx})
    return rows


def mc_prompt(adapter: ModelAdapter, row: dict) -> str:
    body = row["question"] + "\n" + "\n".join(f"{L}. {c}" for L, c in zip(LETTERS, row["choices"], strict=True))
    body += "\nAnswer with the letter of the correct option only."
    return adapter.prompt(body) + "The answer is "


@torch.no_grad()
def mc_accuracy(adapter: ModelAdapter, rows: list[dict], batch_size: int = 8, steerer=None,
                source: str = "built-in") -> CapabilityResult:
    """Accuracy: the option letter with the highest next-token probability is the model's answer."""
    tok = adapter.tokenizer
    letter_ids = [[tok(v, add_special_tokens=False)["input_ids"][0] for v in (L, " " + L)] for L in LETTERS]
    correct = 0
    ctx = steerer if steerer is not None else _Null()
    with ctx:
        for s in range(0, len(rows), batch_size):
            chunk = rows[s : s + batch_size]
            ids, mask = pad_batch([adapter.encode_prompt(mc_prompt(adapter, r)) for r in chunk],
                                  pad_id(tok), "left")
            logits = adapter.model(input_ids=ids.to(adapter.device), attention_mask=mask.to(adapter.device),
                                   position_ids=position_ids_for(mask).to(adapter.device),
                                   logits_to_keep=1).logits[:, -1].float()
            probs = logits.softmax(-1)
            scores = torch.stack([probs[:, ids_].sum(-1) for ids_ in letter_ids], -1)
            correct += int((scores.argmax(-1).cpu() == torch.tensor([r["answer"] for r in chunk])).sum())
    return CapabilityResult(correct / max(len(rows), 1), len(rows), source)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None
