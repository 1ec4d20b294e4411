"""The values the monitoring run and its report share: its configuration and its result."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class MonitorConfig:
    """Counts for the two monitoring experiments; `MONITOR_PROFILES` holds a quick CPU one and a paper-sized one."""

    n_questions: int | None = 4  # first N evaluation questions (None: all)
    samples: int = 1
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 8
    seed: int = 0
    shots: tuple[int, ...] = (0, 5, 10, 15, 20)
    shot_chars: int | None = 240  # truncate each in-context answer to keep prompts short (None: keep whole)
    judge_batch_size: int = 8
    experiments: tuple[str, ...] = ("system", "shots")
    examples: int = 4  # answers shown as heat maps in the report


@dataclass
class MonitorResult:
    """What `run_monitor` measured and where it wrote the report."""

    trait: str
    model: str
    layer: int
    experiments: dict[str, dict]
    files: dict[str, str]
    seconds: float
    records: list[dict] = field(default_factory=list, repr=False)
