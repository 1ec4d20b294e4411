"""A judge on any OpenAI-compatible endpoint: the paper's 0–100 score from one token's top logprobs.

`OpenAIJudge` asks for one token at temperature 0 with `logprobs` and `top_logprobs=20` and takes
the probability-weighted mean over the tokens that are integers 0..100; the score
is missing when less than 0.25 of the probability sits on integers. Requests run in a thread pool
(`concurrency`), and 408/409/429/5xx answers, timeouts and dropped connections are retried with
exponential backoff (the SDK's own retries are off, so the count and the waits are ours) within a
bounded number of tries and seconds of waiting; then JudgeAPIError names the endpoint.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from .local import MASS_THRESHOLD, Judge, JudgeRequest, expected_score

RETRY_STATUS = {408, 409, 429}
API_MODE = "api_0_100"


class JudgeAPIError(RuntimeError):
    """An API judge that cannot score: the endpoint failed past the retry budget, or it gives no logprobs."""


def integer_distribution_from_top(top: Sequence[tuple[str, float]]) -> dict[int, float]:
    """P(integer n) from (token text, logprob) pairs: tokens that are the integers 0..100, spaces ignored."""
    dist: dict[int, float] = {}
    for token, logprob in top:
        t = token.strip()
        if t.isdigit() and t.isascii() and (t == "0" or not t.startswith("0")) and int(t) <= 100:
            dist[int(t)] = dist.get(int(t), 0.0) + math.exp(logprob)
    return dist


def score_from_top(top: Sequence[tuple[str, float]], threshold: float = MASS_THRESHOLD) -> float | None:
    """The probability-weighted mean integer, or None when under `threshold` of the mass is on integers."""
    return expected_score(integer_distribution_from_top(top), threshold)


class OpenAIJudge(Judge):
    """Scores trait and coherence with an API model's next-token distribution (mode 'api_0_100')."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 8,
                 max_retries: int = 5, timeout: float = 60.0, backoff: float = 1.0, max_backoff: float = 30.0,
                 budget_s: float = 300.0):
        import openai

        self.base_url = base_url
        self.model = model
        self.name = f"api:{model}"
        self.concurrency = max(1, concurrency)
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.budget_s = budget_s  # the most seconds one request may spend waiting between its tries
        # local servers (vLLM, `personascope serve`) often need no key, but the SDK insists on one
        key = os.environ.get(api_key_env) or "no-key"
        self.client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=timeout)
        self.calls = 0  # HTTP requests made, retries included

    def mode_for(self, kind: str) -> str:
        return API_MODE

    def score(self, requests: Sequence[JudgeRequest]) -> list[float | None]:
        if not requests:
            return []
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests))) as pool:
            return list(pool.map(self.score_one, requests))

    def score_one(self, req: JudgeRequest) -> float | None:
        resp = self._call(req.rubric_prompt())
        choice = resp.choices[0] if resp.choices else None
        if choice is None or choice.logprobs is None or choice.logprobs.content is None:
            raise JudgeAPIError(f"judge endpoint {self.base_url} returned no logprobs for {self.model!r}; the API "
                                "judge needs an endpoint that supports logprobs and top_logprobs")
        content = choice.logprobs.content
        if not content:  # no token at all (e.g. an immediate end of text): nothing to score
            return None
        first = content[0]
        top = [(t.token, t.logprob) for t in (first.top_logprobs or [])] or [(first.token, first.logprob)]
        return score_from_top(top)

    def _call(self, prompt: str):
        import openai

        waited = 0.0
        for attempt in range(self.max_retries + 1):
            self.calls += 1
            try:
                return self.client.chat.completions.create(
                    model=self.model, messages=[{"role": "user", "content": prompt}], max_tokens=1, temperature=0,
                    logprobs=True, top_logprobs=20)
            except (openai.APITimeoutError, openai.APIConnectionError, openai.APIStatusError) as e:
                status = getattr(e, "status_code", None)
                retryable = status is None or status in RETRY_STATUS or status >= 500
                wait = self._wait(attempt, e)
                if not retryable or attempt == self.max_retries or waited + wait > self.budget_s:
                    what = f"HTTP {status}" if status is not None else type(e).__name__
                    tries = f"after {attempt + 1} tries" if retryable else "(not retried)"
                    detail = " ".join(str(getattr(e, "message", "") or e).split())[:200]
                    raise JudgeAPIError(f"judge endpoint {self.base_url} (model {self.model!r}) failed {tries}: "
                                        f"{what}: {detail}") from e
                waited += wait
                time.sleep(wait)
        raise AssertionError("unreachable")

    def _wait(self, attempt: int, error: Exception) -> float:
        """Exponential backoff with jitter, or the server's Retry-After when it gives one (capped)."""
        response = getattr(error, "response", None)
        after = response.headers.get("retry-after") if response is not None else None
        try:
            if after is not None:
                return min(self.max_backoff, max(0.0, float(after)))
        except ValueError:
            pass
        return min(self.max_backoff, self.backoff * 2**attempt * (1 + 0.25 * random.random()))


def make_judge(judge_model: str, judge_mode: str | None = None, judge_url: str | None = None,
               device: str | None = None) -> Judge:
    """The API judge at `judge_url` when given, else the local judge model (with its scoring mode).

    Without a mode, a judge model with shipped probe weights is a ProbeJudge; any other is a LocalJudge (`auto`).

    An API judge has one scoring mode (the 0-100 logprob mean), so a `judge_mode` with `judge_url` is refused.
    """
    if judge_url:
        if judge_mode is not None:
            raise ValueError(f"--judge-mode {judge_mode} applies to a local judge only; an API judge (--judge-url) "
                             "always scores 0-100 from logprobs: drop --judge-mode or --judge-url")
        return OpenAIJudge(judge_url, judge_model)
    from .local import load_local_judge
    from .probe import load_probe_judge, probe_weights_path

    if judge_mode == "probe" or (judge_mode is None and probe_weights_path(judge_model).exists()):
        return load_probe_judge(judge_model, device=device)
    return load_local_judge(judge_model, trait_mode=judge_mode, device=device)
