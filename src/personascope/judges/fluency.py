"""Fluency: is an answer readable text, judged without trusting the judge alone.

Broken text comes in two kinds: loops (low perplexity, high repetition) and gibberish (high perplexity,
script switches). Each answer gets judge-free evidence — word n-gram repetition, zlib compression, letters
outside the question's scripts, and the *unsteered* model's mean per-token negative log-likelihood of the
answer given the question — combined by a logistic model fitted on read labels (`data/fluency.json`,
made by `experiments/fluency.py`), then gated by the judge's coherence when there is one.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from personascope.model import ModelAdapter, pad_batch, pad_id
from personascope.util import data_path

FLUENCY_FEATURES = ("nll", "repeat3", "repeat1", "compression", "foreign_script")
MIN_COHERENCE = 30.0  # a judge coherence below this marks an answer broken whatever the text evidence says
_WORD = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True)
class Fluency:
    """One answer's fluency: `score` is P(fluent) × 100 from the text and the unsteered model; `fluent` also
    needs the judge's coherence (when given) to be at least MIN_COHERENCE."""

    score: float
    fluent: bool
    nll: float | None
    repeat3: float
    repeat1: float
    compression: float
    foreign_script: float

    def to_json(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _repeat_share(tokens: list[str], n: int) -> float:
    """The share of word n-grams that already occurred earlier in the text (0 for short texts)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 0.0 if len(grams) < 2 else 1.0 - len(set(grams)) / len(grams)


def _scripts(text: str) -> dict[str, int]:
    """Letter counts per script (the first word of each letter's Unicode name: LATIN, CJK, CYRILLIC, …)."""
    out: dict[str, int] = {}
    for ch in text:
        if ch.isalpha():
            name = unicodedata.name(ch, "UNKNOWN").split(" ")[0]
            out[name] = out.get(name, 0) + 1
    return out


def text_features(question: str, answer: str) -> dict[str, float]:
    """The judge-free text evidence of one answer (no model needed)."""
    tokens = _WORD.findall(answer.lower())
    raw = answer.encode("utf-8", "replace")
    compression = len(zlib.compress(raw, 9)) / len(raw) if len(raw) >= 40 else 1.0
    q_scripts = set(_scripts(question)) or {"LATIN"}
    a_scripts = _scripts(answer)
    letters = sum(a_scripts.values())
    foreign = sum(v for k, v in a_scripts.items() if k not in q_scripts) / letters if letters else 0.0
    return {"repeat3": _repeat_share(tokens, 3), "repeat1": _repeat_share(tokens, 1),
            "compression": compression, "foreign_script": foreign}


@torch.no_grad()
def answer_nll(adapter: ModelAdapter, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 4
               ) -> list[float | None]:
    """Mean per-token negative log-likelihood (nats) of each answer after its rendered prompt, under the model
    as loaded (call it outside any steering); None for an empty answer."""
    items = [adapter.encode_pair(p, a) for p, a in zip(prompts, answers, strict=True)]
    out: list[float | None] = [None] * len(items)
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]) + len(items[i][1]))
    for s in range(0, len(order), batch_size):
        idx = [i for i in order[s : s + batch_size] if items[i][1]]
        if not idx:
            continue
        ids, mask = pad_batch([items[i][0] + items[i][1] for i in idx], pad_id(adapter.tokenizer), "right")
        dev = adapter.device
        logits = adapter.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False).logits
        for row, i in enumerate(idx):
            n_p, n_a = len(items[i][0]), len(items[i][1])
            lp = logits[row, n_p - 1 : n_p + n_a - 1].float().log_softmax(-1)
            target = torch.tensor(items[i][1], device=lp.device)
            out[i] = float(-lp.gather(1, target[:, None]).mean())
    return out


@dataclass(frozen=True)
class FluencyModel:
    """A logistic model over FLUENCY_FEATURES (standardised), with the P(fluent) threshold chosen on the tuning part."""

    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    threshold: float
    nll_missing: float  # the value an answer with no tokens (or no model) gets for `nll`

    def p_fluent(self, feats: dict[str, float | None]) -> float:
        z = self.intercept
        for k, m, s, c in zip(FLUENCY_FEATURES, self.mean, self.scale, self.coef, strict=True):
            v = feats.get(k)
            z += c * (((self.nll_missing if v is None else v) - m) / s)
        return 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, z))))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps({"features": list(FLUENCY_FEATURES), **asdict(self)}, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path | None = None) -> FluencyModel:
        """The shipped model (`data/fluency.json`) or one saved by `save`."""
        raw = json.loads(Path(path or data_path("fluency.json")).read_text())
        if raw.pop("features") != list(FLUENCY_FEATURES):
            raise ValueError(f"{path}: fluency model features differ from {FLUENCY_FEATURES}")
        return cls(**raw)


def fluency_of(model: FluencyModel, feats: dict[str, float | None], coherence: float | None = None) -> Fluency:
    """Combine the text evidence and the judge's coherence into one `Fluency`."""
    p = model.p_fluent(feats)
    ok = p >= model.threshold and (coherence is None or not math.isfinite(coherence) or coherence >= MIN_COHERENCE)
    return Fluency(score=100.0 * p, fluent=ok, nll=feats.get("nll"),
                   **{k: float(feats[k] or 0.0) for k in FLUENCY_FEATURES if k != "nll"})


def score_fluency(adapter: ModelAdapter | None, questions: Sequence[str], answers: Sequence[str],
                  coherence: Sequence[float | None] | None = None, prompts: Sequence[str] | None = None,
                  model: FluencyModel | None = None) -> list[Fluency]:
    """Fluency of each answer to its question; `adapter` is the *unsteered* subject model (None: text only),
    `prompts` the rendered prompts the answers followed (default: the bare question)."""
    model = model or FluencyModel.load()
    if adapter is not None:
        prompts = prompts if prompts is not None else [adapter.prompt(q) for q in questions]
        nlls = answer_nll(adapter, prompts, answers)
    else:
        nlls = [None] * len(answers)
    coh = coherence if coherence is not None else [None] * len(answers)
    return [fluency_of(model, {**text_features(q, a), "nll": n}, c)
            for q, a, n, c in zip(questions, answers, nlls, coh, strict=True)]


def fluent_share(flags: Sequence[bool | None]) -> float | None:
    """The share of answers flagged fluent (None when none were measured)."""
    known = [f for f in flags if f is not None]
    return sum(known) / len(known) if known else None
