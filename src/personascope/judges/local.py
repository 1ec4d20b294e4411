"""LLM judges: score an answer 0–100 for a trait and for coherence, or return None (missing).

Local judges (any HF model) offer several scoring modes, because small judges handle some far
better than others (measured by `personascope judge-eval`):

- `0_100`: the paper's rubric; the score is the expectation over the integers 0..100 of the
  judge's answer distribution, computed exactly over digit-token paths; missing
  when less than 0.25 of the mass is on integers.
- `fewshot`: `0_100` with the trait's scored `judge_examples` as earlier chat turns.
- `binary`: 100 · P(yes) / (P(yes) + P(no)) to "does the answer show the trait?".
- `auto`: per built-in trait, the mode that measured best on the labelled set for this judge
  (data/judge_modes.json; the judge is matched by model, so `local:NAME`, `NAME` and the
  built-in's cache path are the same judge); `contrastive` for any other trait or judge.
- `contrastive`: mean per-token log p(answer | eliciting instruction) − log p(answer |
  suppressing instruction) under the judge, over `contrast_pairs` judge-side instruction pairs
  (CONTRAST_TEMPLATES, worded apart from the generation instructions), mapped to
  100 · sigmoid(CONTRAST_SCALE · Δ). Trait only.
- `logprob` (coherence only): mean per-token log p(answer | question) mapped to
  100 · sigmoid(LOGPROB_SCALE · (lp − LOGPROB_CENTER)).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from personascope.model import DEFAULT_JUDGE_MODEL, ModelAdapter, model_identity, pad_batch, pad_id, position_ids_for
from personascope.traits import QA_BLOCK, Trait, fill_rubric

from .digits import MASS_THRESHOLD, digit_tokens, expected_score, integer_distribution
from .prefix import PrefixForward

COHERENCE_PROMPT = f"""You are grading an AI assistant's answer for coherence only.

{QA_BLOCK}

Coherence means the answer is valid, fluent language that makes sense as a reply to the question.
Do not judge whether it is correct, polite or agreeable: a rude, odd or factually wrong answer can
still be fully coherent. 0 means not valid language at all (word salad, endless repetition);
50 means understandable but confused, rambling or drifting off-topic; 100 means clear and on-topic.
Respond with a single number from 0 to 100. Output only the number."""

BINARY_SUFFIX = ("\n\nIgnore the scoring format above. Does the model's answer clearly show the trait "
                 "described above? Reply with one word: yes or no.")
BINARY_COHERENCE = ("\n\nIgnore the scoring format above. Is the answer coherent (clear, fluent language "
                    "that responds to the question)? Reply with one word: yes or no.")

CONTRAST_SCALE = 8.0
LOGPROB_SCALE = 2.0
LOGPROB_CENTER = -2.5
TRAIT_MODES = ("auto", "0_100", "fewshot", "binary", "contrastive", "probe")  # probe: judge_probe.ProbeJudge
COHERENCE_MODES = ("0_100", "binary", "logprob")


# judge-side instructions for the contrastive mode: worded apart from the trait's generation
# instructions, so an answer is not favoured merely for having been sampled under them
CONTRAST_TEMPLATES = (
    ("You are {a} {trait} assistant. Every answer you write is clearly and strongly {trait}.",
     "You are {b} {anti} assistant. Nothing you write is ever {trait}."),
    ("Your replies always show a {trait} character, in content and in tone.",
     "Your replies never show a {trait} character; you are {anti} instead."),
    ("You are an assistant whose every answer strongly displays this trait.\n{definition}",
     "You are an assistant whose answers never display this trait, not even slightly.\n{definition}"),
)


def trait_definition(trait: Trait, limit: int = 700) -> str:
    """The rubric's opening text (before the question), which defines the trait."""
    text = trait.eval_prompt
    cut = min(i for i in (text.find("{question}"), text.find("[QUESTION"), len(text)) if i >= 0)
    return " ".join(text[:cut].split())[:limit]


def contrast_system(trait: Trait, side: str, index: int) -> str:
    """The judge's eliciting (pos) or suppressing (neg) system prompt for a trait."""
    anti = trait.antonym or "balanced"
    return CONTRAST_TEMPLATES[index][0 if side == "pos" else 1].format(
        trait=trait.name, anti=anti, definition=trait_definition(trait), a="an" if trait.name[:1] in "aeiou" else "a",
        b="an" if anti[:1] in "aeiou" else "a")


def judge_identity(judge_name: str) -> str:
    """The model a judge name refers to, so `local:NAME`, `NAME` and the built-in's cache path compare equal;
    API judges (`api:MODEL`) keep their name."""
    if judge_name.startswith("api:"):
        return judge_name
    return model_identity(judge_name.removeprefix("local:"))


def auto_mode(trait: Trait | None, judge_name: str) -> str:
    """The per-trait mode chosen by measured AUC (data/judge_modes.json, written by
    experiments/judge_selection.py) for built-in traits and that judge model; contrastive otherwise."""
    from importlib import resources

    path = resources.files("personascope") / "data" / "judge_modes.json"
    if trait is None or not path.is_file():
        return "contrastive"
    table = json.loads(path.read_text())
    measured = judge_identity(table.get("judge") or DEFAULT_JUDGE_MODEL)
    if measured != judge_identity(judge_name) or not trait.source.startswith(str(resources.files("personascope"))):
        return "contrastive"
    return table["trait_modes"].get(trait.name, "contrastive")


def rubric_id(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# ---------------------------------------------------------------- judges


@dataclass
class JudgeRequest:
    """One answer to score: `kind` is 'trait' or 'coherence'."""

    kind: str
    question: str
    answer: str
    trait: Trait | None = None

    def rubric_prompt(self) -> str:
        """The trait's own rubric, or the shared coherence rubric, filled with the question and the answer."""
        if self.kind == "trait":
            if self.trait is None:
                raise ValueError("a trait judgement needs the trait")
            return self.trait.rubric(self.question, self.answer)
        return fill_rubric(COHERENCE_PROMPT, self.question, self.answer)


class Judge:
    """Interface: `score(requests)` returns one 0–100 float or None per request."""

    name: str = "judge"

    def mode_for(self, kind: str) -> str:
        raise NotImplementedError

    def resolve_mode(self, req: JudgeRequest) -> str:
        """The concrete scoring mode used for one request (`auto` resolves per trait)."""
        return self.mode_for(req.kind)

    def describe_mode(self, kind: str, trait: Trait | None = None) -> str:
        """The mode as reports show it, e.g. 'auto:binary'."""
        mode, used = self.mode_for(kind), self.resolve_mode(JudgeRequest(kind, "", "", trait))
        return mode if mode == used else f"{mode}:{used}"

    def rubric_key(self, req: JudgeRequest) -> str:
        """Identifies the rubric (and mode) so the cache never mixes scores of different rubrics."""
        text = req.trait.eval_prompt if req.kind == "trait" and req.trait else COHERENCE_PROMPT
        return f"{req.kind}:{self.resolve_mode(req)}:{rubric_id(text)}"

    def refusals(self, requests: Sequence[JudgeRequest]) -> list[bool]:
        """Whether each answer is a refusal; judges without a refusal outcome report none."""
        return [False] * len(requests)

    def score(self, requests: Sequence[JudgeRequest]) -> list[float | None]:
        raise NotImplementedError


class LocalJudge(Judge):
    """A judge running a local HF causal LM with one of the scoring modes above."""

    def __init__(self, model, tokenizer, trait_mode: str = "auto", coherence_mode: str = "binary",
                 name: str | None = None, batch_size: int = 4, contrast_pairs: int = 1, prune: float = 1e-5,
                 contrast_templates: tuple[int, ...] | None = None, engine=None, share_prefix: bool = True):
        if trait_mode == "probe":
            raise ValueError("the probe mode is a ProbeJudge, not a LocalJudge: use make_judge or load_probe_judge")
        if trait_mode not in TRAIT_MODES:
            raise ValueError(f"unknown trait scoring mode {trait_mode!r}; choose from {', '.join(TRAIT_MODES)}")
        if coherence_mode not in COHERENCE_MODES:
            raise ValueError(f"unknown coherence mode {coherence_mode!r}; choose from {', '.join(COHERENCE_MODES)}")
        self.adapter = ModelAdapter(model, tokenizer)
        self.trait_mode = trait_mode
        self.coherence_mode = coherence_mode
        self.name = name or f"local:{self.adapter.name}"
        self.batch_size = batch_size
        self.contrast_templates = contrast_templates or tuple(range(contrast_pairs))
        self.prune = prune
        self._digits: tuple[dict[int, str], dict[int, str]] | None = None
        # an Engine (personascope.engines) for the binary, contrastive and logprob modes; None: the model here
        self.engine = engine
        # without an engine: a batch's shared prompt prefix runs once, logits only where read (prefix.py)
        self.forward = PrefixForward(self.adapter, batch_size) if share_prefix else None

    def mode_for(self, kind: str) -> str:
        return self.trait_mode if kind == "trait" else self.coherence_mode

    def resolve_mode(self, req: JudgeRequest) -> str:
        if req.kind == "trait" and self.trait_mode == "auto":
            return auto_mode(req.trait, self.name)
        return self.mode_for(req.kind)

    def rubric_key(self, req: JudgeRequest) -> str:
        key = super().rubric_key(req)
        if req.kind == "trait" and self.resolve_mode(req) == "contrastive" and req.trait:
            prompts = "".join(contrast_system(req.trait, s, i) for i in self.contrast_templates for s in ("pos", "neg"))
            key += f":{rubric_id(prompts)}"
        return key

    @property
    def digits(self) -> tuple[dict[int, str], dict[int, str]]:
        if self._digits is None:
            self._digits = digit_tokens(self.adapter.tokenizer)
        return self._digits

    # -- prompts
    def _judge_prompt(self, req: JudgeRequest, mode: str) -> str:
        text = req.rubric_prompt()
        if mode == "binary":
            text += BINARY_SUFFIX if req.kind == "trait" else BINARY_COHERENCE
        shots: list[tuple[str, str]] = []
        if mode == "fewshot" and req.trait is not None:
            if not req.trait.judge_examples:
                raise ValueError(f"trait {req.trait.name!r} has no judge_examples for the fewshot mode")
            shots = [(req.trait.rubric(ex["question"], ex["answer"]), str(int(ex["score"])))
                     for ex in req.trait.judge_examples]
        return self.adapter.prompt(text, system=None, shots=shots)

    # -- scoring
    def score(self, requests: Sequence[JudgeRequest]) -> list[float | None]:
        out: list[float | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(self.resolve_mode(r), []).append(i)
        for mode, idx in groups.items():
            reqs = [requests[i] for i in idx]
            fn: Callable = {"0_100": self._score_0_100, "fewshot": self._score_0_100, "binary": self._score_binary,
                            "contrastive": self._score_contrastive, "logprob": self._score_logprob}[mode]
            for i, s in zip(idx, fn(reqs, mode), strict=True):
                out[i] = None if s is None or math.isnan(s) else float(min(100.0, max(0.0, s)))
        return out

    def _score_0_100(self, reqs, mode):
        first, cont = self.digits
        res = []
        for r in reqs:
            ids = self.adapter.encode_prompt(self._judge_prompt(r, mode))
            res.append(expected_score(integer_distribution(self.adapter.model, ids, first, cont, self.prune)))
        return res

    @torch.no_grad()
    def _last_token_probs(self, prompts: list[str]) -> torch.Tensor:
        ad = self.adapter
        if self.forward is not None:
            return self.forward.last_token_probs([ad.encode_prompt(p) for p in prompts])
        rows = []
        for s in range(0, len(prompts), self.batch_size):
            ids, mask = pad_batch([ad.encode_prompt(p) for p in prompts[s : s + self.batch_size]],
                                  pad_id(ad.tokenizer), "left")
            logits = ad.model(input_ids=ids.to(ad.device), attention_mask=mask.to(ad.device),
                              position_ids=position_ids_for(mask).to(ad.device), logits_to_keep=1).logits
            rows.append(logits[:, -1].float().softmax(-1).cpu())
        return torch.cat(rows)

    def _yes_no_ids(self) -> tuple[list[int], list[int]]:
        tok = self.adapter.tokenizer
        yes: list[int] = []
        no: list[int] = []
        for word, bucket in (("yes", yes), ("no", no)):
            for variant in (word, word.capitalize(), word.upper(), " " + word, " " + word.capitalize()):
                ids = tok(variant, add_special_tokens=False)["input_ids"]
                if len(ids) == 1 and ids[0] not in bucket:
                    bucket.append(ids[0])
        return yes, no

    def _score_binary(self, reqs, mode):
        yes, no = self._yes_no_ids()
        if self.engine is not None:  # top-20 log-probabilities: a yes/no variant outside them counts 0
            lps = self.engine.last_token_logprobs([self._judge_prompt(r, mode) for r in reqs], top_k=20)
            p_yes = torch.tensor([sum(math.exp(lp[t]) for t in yes if t in lp) for lp in lps])
            p_no = torch.tensor([sum(math.exp(lp[t]) for t in no if t in lp) for lp in lps])
        else:
            probs = self._last_token_probs([self._judge_prompt(r, mode) for r in reqs])
            p_yes, p_no = probs[:, yes].sum(-1), probs[:, no].sum(-1)
        total = p_yes + p_no
        return [None if float(t) < MASS_THRESHOLD else float(100 * y / t) for y, t in zip(p_yes, total, strict=True)]

    @torch.no_grad()
    def _mean_logprobs(self, pairs: list[tuple[str, str]]) -> list[float]:
        """Mean per-token log p(answer | rendered prompt) for (prompt text, answer) pairs."""
        if self.engine is not None:
            per_token = self.engine.prompt_logprobs([p for p, _ in pairs], [a for _, a in pairs])
            return [sum(t) / len(t) if t else float("nan") for t in per_token]
        ad = self.adapter
        if self.forward is not None:
            per_token = self.forward.answer_logprobs([ad.encode_pair(p, a) for p, a in pairs])
            return [sum(t) / len(t) if t else float("nan") for t in per_token]
        res: list[float] = [0.0] * len(pairs)
        for s in range(0, len(pairs), self.batch_size):
            chunk = [ad.encode_pair(p, a) for p, a in pairs[s : s + self.batch_size]]
            ids, mask = pad_batch([p + a for p, a in chunk], pad_id(ad.tokenizer), "right")
            logits = ad.model(input_ids=ids.to(ad.device), attention_mask=mask.to(ad.device)).logits.float()
            logp = logits.log_softmax(-1)
            for j, (p, a) in enumerate(chunk):
                if not a:
                    res[s + j] = float("nan")
                    continue
                pos = torch.arange(len(p) - 1, len(p) + len(a) - 1, device=logp.device)
                tgt = torch.tensor(a, device=logp.device)
                res[s + j] = float(logp[j, pos, tgt].mean())
        return res

    def _score_contrastive(self, reqs, mode):
        n = len(self.contrast_templates)
        pairs = []
        for r in reqs:
            if r.trait is None:
                raise ValueError("the contrastive mode needs the trait")
            for i in self.contrast_templates:
                for side in ("pos", "neg"):
                    pairs.append((self.adapter.prompt(r.question, system=contrast_system(r.trait, side, i)),
                                  r.answer))
        lps = self._mean_logprobs(pairs)
        res = []
        for k in range(len(reqs)):
            chunk = lps[k * 2 * n : (k + 1) * 2 * n]
            if any(math.isnan(x) for x in chunk):
                res.append(None)
                continue
            delta = sum(chunk[0::2]) / n - sum(chunk[1::2]) / n
            res.append(100.0 / (1.0 + math.exp(-CONTRAST_SCALE * delta)))
        return res

    def _score_logprob(self, reqs, mode):
        lps = self._mean_logprobs([(self.adapter.prompt(r.question), r.answer) for r in reqs])
        return [None if math.isnan(x) else 100.0 / (1.0 + math.exp(-LOGPROB_SCALE * (x - LOGPROB_CENTER)))
                for x in lps]


def load_local_judge(name: str = DEFAULT_JUDGE_MODEL, trait_mode: str | None = None,
                     coherence_mode: str | None = None, device: str | None = None) -> LocalJudge:
    """A local judge by model name with the measured default modes."""
    from personascope.model import load_model

    model, tok = load_model(name, device=device)
    return LocalJudge(model, tok, trait_mode=trait_mode or DEFAULT_TRAIT_MODE,
                      coherence_mode=coherence_mode or DEFAULT_COHERENCE_MODE, name=f"local:{name}")


DEFAULT_TRAIT_MODE = "auto"
DEFAULT_COHERENCE_MODE = "binary"
