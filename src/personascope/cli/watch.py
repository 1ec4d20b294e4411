"""`personascope watch`: chat with a model in the terminal while a persona vector is read out live.

Before each answer the projection of the last prompt token is shown as a trait meter (calibrated
against the trait's most suppressing and most eliciting system prompts); the answer is then
printed with every token coloured by its own projection. With a persona guard (`guard.Guard`), the
meter shows the guard's threshold, tokens chosen while the guard acted are overlined, and each answer
ends with how many tokens it touched. Works with piped (non-TTY) input.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from rich.console import Console
from rich.text import Text

from personascope.model import ModelAdapter
from personascope.monitor import (
    HeatmapItem,
    Trace,
    VectorLike,
    calibrate,
    color_scale,
    diverging,
    project_prompts,
    render_heatmap,
    trace_generation,
)
from personascope.steering import CapSpec, Guard
from personascope.vectors import PersonaVector

QUIT = {"/quit", "/exit", "/q"}


@dataclass
class Turn:
    """One exchange: the user's line, the prompt projection, the traced answer and whether it crossed the threshold."""

    user: str
    prompt_value: float
    trace: Trace
    flagged: bool = False
    guarded: list[bool] = field(default_factory=list)  # per answer token: chosen while the guard acted


@dataclass
class Meter:
    """Maps a projection to a bar between a low (suppressing) and a high (eliciting) reference."""

    low: float | None = None
    high: float | None = None
    threshold: float | None = None
    guard_at: float | None = None  # where the guard starts to act (its cap or condition threshold)
    seen: list[float] = field(default_factory=list)

    def bounds(self) -> tuple[float, float]:
        if self.low is not None and self.high is not None and self.low != self.high:
            return self.low, self.high
        lo, hi = min(self.seen, default=0.0), max(self.seen, default=1.0)
        return (lo - 1.0, hi + 1.0) if hi - lo < 1e-6 else (lo, hi)

    def colours(self) -> tuple[float, float]:
        """Centre and half-width of the token colour scale."""
        lo, hi = self.bounds()
        return (lo + hi) / 2, abs(hi - lo) / 2 or 1.0

    def render(self, value: float, width: int = 30) -> Text:
        self.seen.append(value)
        lo, hi = self.bounds()
        frac = max(0.0, min(1.0, (value - lo) / (hi - lo)))
        filled = round(frac * width)
        center, scale = self.colours()
        bg, _ = diverging(value, center, scale)
        text = Text("trait meter ", style="bold")
        text.append("▕")
        text.append("█" * filled, style=bg)
        text.append("░" * (width - filled), style="grey50")
        text.append("▏ ")
        text.append(f"{value:+.2f}", style="bold")
        if self.low is not None and self.high is not None:
            text.append(f"   (suppressing {self.low:+.2f} … eliciting {self.high:+.2f})", style="dim")
        if self.threshold is not None and value >= self.threshold:
            text.append(f"  ▲ above threshold {self.threshold:g}", style="bold red")
        if self.guard_at is not None:
            fires = value > self.guard_at
            text.append(f"  guard {'fires' if fires else 'idle'} (acts above {self.guard_at:+.2f})",
                        style="bold dark_orange" if fires else "dim")
        return text


def answer_text(trace: Trace, meter: Meter, guarded: list[bool] | None = None) -> Text:
    """The answer with each token on its projection's colour; tokens over the threshold are underlined and
    tokens chosen while the guard acted overlined."""
    center, scale = meter.colours()
    text = Text()
    flags = guarded or []
    for i, (tok, v) in enumerate(zip(trace.tokens, trace.at(), strict=True)):
        bg, fg = diverging(v, center, scale)
        over = meter.threshold is not None and v >= meter.threshold
        text.append(tok, style=f"{fg} on {bg}" + (" bold underline" if over else "")
                    + (" overline" if i < len(flags) and flags[i] else ""))
    return text


def guard_threshold(guard: Guard, layer: int) -> float | None:
    """The projection above which the guard acts at `layer` (a cap's upper bound or a condition's threshold)."""
    for s in guard.specs:
        at, value = (s.layer, s.hi) if isinstance(s, CapSpec) else (s.condition_layer, s.threshold)
        if at == layer and isinstance(value, int | float):
            return float(value)
    return None


def read_lines(stream: TextIO, console: Console) -> Iterator[str]:
    """Lines typed at a prompt (TTY) or read from a pipe (echoed, since a pipe is not)."""
    if stream.isatty():
        while True:
            try:
                yield console.input("[bold cyan]you ›[/] ")
            except (EOFError, KeyboardInterrupt):
                return
    else:
        for line in stream:
            line = line.rstrip("\n")
            console.print(Text("you › ", style="bold cyan") + Text(line))
            yield line


def run_watch(
    adapter: ModelAdapter,
    vector: VectorLike,
    layer: int,
    lines: Iterable[str],
    console: Console | None = None,
    threshold: float | None = None,
    system: str | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.7,
    top_p: float = 1.0,
    history: bool = True,
    html_path: str | Path | None = None,
    guard: Guard | None = None,
) -> list[Turn]:
    """The chat loop: meter before each answer, coloured trace after; `/quit` or end of input stops it.

    With `guard`, answers are generated under it and each turn records which tokens it touched.
    """
    console = console or Console()
    meter = Meter(threshold=threshold, guard_at=guard_threshold(guard, layer) if guard is not None else None)
    trait_name = vector.trait if isinstance(vector, PersonaVector) else None
    if trait_name:
        from personascope.traits import TraitError, load_trait

        with contextlib.suppress(TraitError, ValueError, IndexError):
            meter.low, meter.high = calibrate(adapter, vector, layer, load_trait(trait_name))
    console.print(Text.assemble(("watching ", "dim"), (trait_name or "vector", "bold"), (" on ", "dim"),
                                (adapter.name, "bold"), (f" at layer {layer}", "dim"),
                                ("  (/quit to leave, /reset to forget the conversation)", "dim")))
    turns: list[Turn] = []
    shots: list[tuple[str, str]] = []
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        if line in QUIT:
            break
        if line == "/reset":
            shots = []
            console.print("[dim]conversation cleared")
            continue
        prompt = adapter.prompt(line, system, shots=shots)
        value = project_prompts(adapter, [prompt], vector, layer).values[0][0]
        console.print(meter.render(value))
        with console.status("answering …"), guard if guard is not None else contextlib.nullcontext():
            trace = trace_generation(adapter, [prompt], vector, layer, max_new_tokens, temperature, top_p)[0]
        guarded = guard.last.fired[0][: len(trace.tokens)] if guard is not None and guard.last else []
        console.print(Text("assistant › ", style="bold magenta") + answer_text(trace, meter, guarded))
        if guard is not None:
            console.print(Text(f"guard acted on {sum(guarded)} of {len(trace.tokens)} tokens"
                               + (" (overlined: chosen while it acted)" if any(guarded) else ""),
                               style="dark_orange" if any(guarded) else "dim"))
        vals = trace.at()
        flagged = threshold is not None and (value >= threshold or any(v >= threshold for v in vals))
        if vals:
            k = max(range(len(vals)), key=vals.__getitem__)
            console.print(f"[dim]answer: mean {sum(vals) / len(vals):+.2f} · max {vals[k]:+.2f} at "
                          f"{trace.tokens[k]!r} · {len(vals)} tokens")
        if flagged:
            console.print(f"[bold red]⚠ crossed threshold {threshold:g}")
        turns.append(Turn(line, value, trace, flagged, guarded))
        if history:
            shots.append((line, trace.text.strip()))
        if html_path:
            save_session(turns, meter, html_path, adapter.name, trait_name, layer)
    if threshold is not None and turns:
        marked = [i + 1 for i, t in enumerate(turns) if t.flagged]
        console.print(f"{len(marked)} of {len(turns)} turns crossed {threshold:g}"
                      + (f": turn {', '.join(map(str, marked))}" if marked else ""))
    if html_path and turns:
        console.print(f"session heat map: {html_path}")
    return turns


def save_session(turns: list[Turn], meter: Meter, path: str | Path, model: str, trait: str | None,
                 layer: int) -> Path:
    """All turns of a session as one HTML heat map on the meter's colour scale."""
    center, scale = meter.colours() if meter.low is not None else color_scale(
        [v for t in turns for v in t.trace.at()])
    items = [HeatmapItem(t.trace.tokens, t.trace.at(), title=f"turn {i + 1}: {t.user}",
                         note=f"last prompt token {t.prompt_value:+.3f}" + (" · ⚠ crossed threshold" if t.flagged
                                                                           else "")
                         + (f" · guard acted on {sum(t.guarded)} tokens" if t.guarded else ""),
                         prompt_value=t.prompt_value)
             for i, t in enumerate(turns)]
    return render_heatmap(items, path, title=f"{trait or 'vector'} on {model}, layer {layer}", center=center,
                          scale=scale)
