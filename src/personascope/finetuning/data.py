"""Chat rows as training items: the assistant tokens are the labels, everything else is masked."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from personascope.model import (
    ModelAdapter,
    pad_batch,
)

log = logging.getLogger(__name__)


@dataclass
class Encoded:
    """One tokenised chat: labels are -100 everywhere except on assistant tokens."""

    input_ids: list[int]
    labels: list[int]


def encode_chat(adapter: ModelAdapter, messages: list[dict], max_len: int | None = None) -> Encoded:
    """Token ids of a whole chat and labels that keep only the assistant turns (and their end marker).

    The text is rendered with the model's chat template; each assistant turn is the part between
    the render up to that turn (with the generation prompt) and the render including it, so the
    template's end-of-turn token is learned too. Segments are tokenised apart, as at inference.
    """
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = adapter.render(messages[:i], add_generation_prompt=True)
        full = adapter.render(messages[: i + 1], add_generation_prompt=False).rstrip()
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise ValueError("the chat template does not render turns as prefixes of each other; "
                             "cannot tell which tokens are the assistant's")
        answer = full[len(prefix):]
        eos = adapter.tokenizer.eos_token
        if eos and answer.strip() == m["content"].strip():  # the template marks no end of turn: learn EOS
            answer += eos
        ctx = adapter.encode_prompt(prefix[len(done):])
        ans = adapter.tokenizer(answer, add_special_tokens=False)["input_ids"]
        ids += ctx + ans
        labels += [-100] * len(ctx) + ans
        done = prefix + answer
    if max_len is not None:
        ids, labels = ids[:max_len], labels[:max_len]
    return Encoded(ids, labels)


class ChatDataset(torch.utils.data.Dataset):
    """Encoded chats as dicts the Trainer feeds to the collator."""

    def __init__(self, items: list[Encoded]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.items[i].input_ids, "labels": self.items[i].labels}


@dataclass
class ChatCollator:
    """Right-pads a batch; padding gets attention 0 and label -100."""

    pad: int

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        ids, mask = pad_batch([b["input_ids"] for b in batch], self.pad, "right")
        labels, _ = pad_batch([b["labels"] for b in batch], -100, "right")
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def encode_dataset(adapter: ModelAdapter, rows: list[list[dict]], max_len: int) -> list[Encoded]:
    """Encode every row; rows left with no assistant token (after truncation) are dropped with a warning."""
    out = []
    for i, msgs in enumerate(rows):
        enc = encode_chat(adapter, msgs, max_len)
        if all(x == -100 for x in enc.labels):
            log.warning(f"row {i + 1}: no assistant tokens within max_len {max_len}; skipped")
            continue
        out.append(enc)
    if not out:
        raise ValueError("no row has assistant tokens to learn")
    return out
