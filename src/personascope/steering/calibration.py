"""Guard calibration: thresholds from the model's own unprompted answers to a pool of neutral questions.

The model answers questions from `data/questions_pool.json` greedily with no system prompt; the projection
on v̂ at the guard's layer is read where the guard reads it (the last position of every forward: the last
prompt token, then each generated token up to the end of the answer). `hi` is the chosen percentile of
that distribution (per token, or of each answer's mean) and `lo` the mirrored one; both go into the
vector file's metadata under `guard`, so `evaluate`, `watch` and `serve` use the same range.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from importlib import resources

import torch

from personascope.model import ModelAdapter, ResidualHooks, pad_batch, pad_id
from personascope.vectors import PersonaVector

from .guard import GUARD_MODES, Guard, stop_ids
from .steer import DEFAULT_POSITIONS

DISTRIBUTIONS = ("token", "response")
META_KEY = "guard"
OPTIONAL_FIELDS = ("distribution", "n_questions", "mean", "std", "prompt_mean", "prompt_std", "response_mean",
                   "response_std")


@dataclass
class GuardCalibration:
    """The normal range [lo, hi] of the projection on v̂ at `layer`, and how it was measured."""

    layer: int
    lo: float
    hi: float
    percentile: float
    n: int  # values in the distribution (tokens or answers)
    distribution: str = "token"
    n_questions: int = 0
    mean: float = 0.0
    std: float = 0.0
    # the normal range of the two spans a drift trajectory reads (None in files calibrated before they existed)
    prompt_mean: float | None = None  # the last prompt token (the paper's predictor)
    prompt_std: float | None = None
    response_mean: float | None = None  # an answer's mean over its tokens
    response_std: float | None = None
    values: list[float] = field(default_factory=list, repr=False)  # the distribution itself (not stored)

    def normal(self, span: str) -> tuple[float, float] | None:
        """(mean, sd) of a span, 'prompt' or 'response' (None when the calibration predates span statistics)."""
        mean, sd = (self.prompt_mean, self.prompt_std) if span == "prompt" else (self.response_mean, self.response_std)
        return None if mean is None or sd is None else (mean, sd)

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if k != "values"})

    @classmethod
    def from_vector(cls, pv: PersonaVector) -> GuardCalibration | None:
        """The calibration stored in a vector file's metadata (None when it has none)."""
        raw = pv.metadata.get(META_KEY)
        if not raw:
            return None
        try:
            data = json.loads(raw)
            return cls(**{k: data[k] for k in ("layer", "lo", "hi", "percentile", "n")},
                       **{k: data[k] for k in OPTIONAL_FIELDS if k in data})
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{pv.path or 'vector'}: malformed '{META_KEY}' metadata ({e})") from None


def with_calibration(pv: PersonaVector, cal: GuardCalibration) -> PersonaVector:
    """A copy of the vector whose metadata carries the calibration (save it to keep it)."""
    return pv.with_metadata(**{META_KEY: cal.to_json()})


def question_pool() -> list[str]:
    """The shipped pool of everyday questions (no trait in them)."""
    pool = json.loads((resources.files("personascope") / "data" / "questions_pool.json").read_text())
    if not isinstance(pool, list) or not all(isinstance(q, str) for q in pool):
        raise ValueError("data/questions_pool.json must be a list of strings")
    return pool


def pool_sample(n: int | None, seed: int = 0, exclude: int = 0) -> list[str]:
    """n questions of the pool in a fixed shuffled order, after skipping the first `exclude` of that order."""
    pool = question_pool()
    random.Random(seed).shuffle(pool)
    return pool[exclude:] if n is None else pool[exclude : exclude + n]


@torch.no_grad()
def answer_projections(adapter: ModelAdapter, prompts: list[str], unit: torch.Tensor, layer: int,
                       max_new_tokens: int = 64, batch_size: int = 8) -> list[list[float]]:
    """Greedy answers to rendered prompts; per answer, h·v̂ at the last position of every forward until it ends."""
    stops = stop_ids(adapter)
    pid = pad_id(adapter.tokenizer)
    dev = adapter.device
    out: list[list[float]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        ids, mask = pad_batch([adapter.encode_prompt(p) for p in chunk], pid, "left")
        seen: list[torch.Tensor] = []

        def record(h: torch.Tensor) -> None:
            seen.append((h[:, -1].float() @ unit.to(h.device)).cpu())

        with ResidualHooks(adapter, [(layer, record)]):
            gen = adapter.model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                                         max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                         top_p=None, top_k=None, pad_token_id=pid)
        values = torch.stack(seen, 1)  # [B, forwards]: forward k reads the position that yields token k
        new = gen[:, ids.shape[1]:].tolist()
        for b, row in enumerate(new):
            end = next((i for i, t in enumerate(row) if t in stops), len(row) - 1)
            out.append(values[b, : end + 1].tolist())
    return out


def calibrate_guard(
    adapter: ModelAdapter,
    vector: PersonaVector,
    layer: int | None = None,
    percentile: float = 95.0,
    n_questions: int = 64,
    distribution: str = "token",
    max_new_tokens: int = 64,
    batch_size: int = 8,
    questions: list[str] | None = None,
    seed: int = 0,
) -> GuardCalibration:
    """Measure the normal range of the projection on v̂ at a layer from unprompted answers to pool questions."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; choose from {', '.join(DISTRIBUTIONS)}")
    if not 50.0 <= percentile < 100.0:
        raise ValueError(f"percentile must be in [50, 100), got {percentile}")
    vector.check(adapter)
    layer = vector.default_layer(layer)
    adapter.check_layer(layer)
    qs = questions if questions is not None else pool_sample(n_questions, seed)
    if not qs:
        raise ValueError("no questions to calibrate on")
    v = vector.vector(layer)
    unit = v.float() / v.float().norm().clamp(min=1e-12)
    per_answer = answer_projections(adapter, [adapter.prompt(q) for q in qs], unit, layer, max_new_tokens,
                                    batch_size)
    if distribution == "token":
        values = [x for row in per_answer for x in row]
    else:
        values = [sum(row) / len(row) for row in per_answer if row]
    t = torch.tensor(values, dtype=torch.float64)
    hi = float(torch.quantile(t, percentile / 100))
    lo = float(torch.quantile(t, 1 - percentile / 100))
    prompt_mean, prompt_std = _mean_sd([row[0] for row in per_answer if row])
    response_mean, response_std = _mean_sd([sum(row[1:]) / len(row[1:]) for row in per_answer if len(row) > 1])
    return GuardCalibration(layer, lo, hi, percentile, len(values), distribution, len(qs), *_mean_sd(values),
                            prompt_mean, prompt_std, response_mean, response_std, values)


def _mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for fewer than two values or a non-finite result)."""
    if not values:
        return 0.0, 0.0
    t = torch.tensor(values, dtype=torch.float64)
    sd = float(t.std()) if len(values) > 1 else 0.0
    return float(t.mean()), sd if math.isfinite(sd) else 0.0


def guard_for(adapter: ModelAdapter, vector: PersonaVector, mode: str, layer: int | None = None,
              coef: float | None = None, calibration: GuardCalibration | None = None,
              positions: str = DEFAULT_POSITIONS, both_sides: bool = False) -> Guard:
    """A Guard from a calibrated vector: `cap` clamps at hi (and lo with both_sides); `conditional` adds
    `coef · v` (or, without coef, ablates v̂) where the projection is above hi."""
    if mode not in GUARD_MODES:
        raise ValueError(f"unknown guard mode {mode!r}; choose from {', '.join(GUARD_MODES)}")
    cal = calibration or GuardCalibration.from_vector(vector)
    if cal is None:
        raise ValueError(f"{vector.path or 'the vector'} has no guard calibration: run `personascope guard "
                         "calibrate` on it first")
    layer = cal.layer if layer is None else layer
    if layer != cal.layer:
        raise ValueError(f"the guard was calibrated at layer {cal.layer}, not {layer}: calibrate with --layer {layer}")
    guard = Guard(adapter)
    if mode == "cap":
        return guard.cap(vector, layer, cal.lo if both_sides else None, cal.hi, positions)
    return guard.conditional(vector, layer, cal.hi, vector, layer, 1.0 if coef is None else coef, positions,
                             "ablate" if coef is None else "add")
