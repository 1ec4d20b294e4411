"""The drift alert rule, shared by the offline `drift` command and the server: a run of high z-scores, or a rise."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

RULE_SPANS = ("pre", "response")


@dataclass(frozen=True)
class Alert:
    """Where a rule fired: the turn, why, and the value that crossed the line."""

    vector: str
    turn: int
    reason: str  # "run" (z ≥ threshold on `turns` consecutive turns) or "rise" (z rose by ≥ rise since turn 0)
    value: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DriftRule:
    """Flag a vector in a conversation when its z-score on `span` is ≥ `z` on `turns` consecutive assistant turns,
    or (with `rise`) when it has risen by ≥ `rise` since the first turn."""

    z: float = 2.0
    turns: int = 2
    rise: float | None = None
    span: str = "pre"

    def __post_init__(self) -> None:
        if self.span not in RULE_SPANS:
            raise ValueError(f"unknown rule span {self.span!r}; choose from {', '.join(RULE_SPANS)}")
        if self.turns < 1:
            raise ValueError(f"the rule's turns must be ≥ 1, got {self.turns}")

    def describe(self) -> str:
        text = f"{self.span} z ≥ {self.z:g} on {self.turns} consecutive turn{'s' * (self.turns > 1)}"
        return text + (f", or a rise of ≥ {self.rise:g} since the first turn" if self.rise is not None else "")

    def first_alert(self, vector: str, series: Sequence[float | None]) -> Alert | None:
        """The first turn at which the rule fires on one vector's z-score series (None if it never does)."""
        run = 0
        first = next((x for x in series if x is not None), None)
        for t, x in enumerate(series):
            run = run + 1 if x is not None and x >= self.z else 0
            if run >= self.turns:
                return Alert(vector, t, "run", float(x))  # type: ignore[arg-type]
            if self.rise is not None and x is not None and first is not None and x - first >= self.rise:
                return Alert(vector, t, "rise", float(x - first))
        return None

    def score(self, series: Sequence[float | None]) -> float:
        """A continuous version of the rule for ROC curves: the highest mean z over `turns` consecutive turns,
        or the rise when that is larger relative to its own threshold."""
        vals = [x for x in series if x is not None]
        if not vals:
            return float("-inf")
        k = min(self.turns, len(vals))
        best = max(sum(vals[i : i + k]) / k for i in range(len(vals) - k + 1))
        if self.rise is not None and self.rise > 0:
            best = max(best, (max(vals) - vals[0]) * self.z / self.rise)
        return best
