"""Everything the CLI shows: rich tables of the library's results, progress bars, and log lines on stderr.

The library returns dataclasses and dicts, reports progress through `personascope.util.progress_bar` and
warnings through `logging.getLogger("personascope")`; `setup_output` connects those to the terminal.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from personascope.monitor import with_ci
from personascope.util import set_progress_factory
from personascope.vectors import ValidityReport

if TYPE_CHECKING:
    from personascope.monitor import MonitorResult
    from personascope.screen import ScreenResult

console = Console(stderr=True)


class LoggedProgress(Progress):
    """A rich Progress that, when stderr is not a terminal (a log file, nohup), also writes a plain line per task
    at most every `every` seconds: rich alone shows nothing there until the stage ends."""

    def __init__(self, *columns: Any, every: float = 30.0, **kw: Any) -> None:
        super().__init__(*columns, **kw)
        self.every = every
        self._logged: dict[Any, float] = {}
        self._plain = not sys.stderr.isatty()

    def elapsed(self, task_id: Any) -> float:
        return self._tasks[task_id].elapsed or 0.0

    def update(self, task_id: Any, **kw: Any) -> None:  # type: ignore[override]
        super().update(task_id, **kw)
        if not self._plain:
            return
        now = time.monotonic()
        if now - self._logged.setdefault(task_id, now) >= self.every:
            self._logged[task_id] = now
            t = self._tasks[task_id]
            total = "?" if t.total is None else f"{t.total:.0f}"
            print(f"{t.description}: {t.completed:.0f}/{total} {t.fields.get('rate', '')} ({t.elapsed or 0:.0f} s)",
                  file=sys.stderr, flush=True)


def rich_progress() -> LoggedProgress:
    """The rich progress bar every long stage shows in the terminal (with plain progress lines in logs)."""
    return LoggedProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=console, transient=False)


def setup_output(level: int = logging.INFO) -> None:
    """Route the library's log records to stderr through rich and show its progress as rich bars."""
    logger = logging.getLogger("personascope")
    if not any(isinstance(h, RichHandler) for h in logger.handlers):
        handler = RichHandler(console=console, show_time=False, show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    set_progress_factory(rich_progress)  # type: ignore[arg-type]  # rich.Progress has the tracker's methods


def print_eval_rows(rows: list[dict], title: str) -> None:
    """A table of an evaluation sweep: trait and coherence (mean ± sd) per condition."""
    table = Table(title=title)
    with_cap = any("capability" in r for r in rows)
    with_guard = any(r.get("guard") for r in rows)
    cols = ["condition", "layer", "coef", "alpha", "trait", "coherence", "n"] + (["MC accuracy"] if with_cap else [])
    cols += ["guard tokens/answer", "answers guarded"] if with_guard else []
    for col in cols:
        table.add_column(col)

    def f(m, s):
        return "—" if m is None else f"{m:.1f} ± {s:.1f}"

    for r in rows:
        table.add_row(r["condition"][:48], str(r["layer"] if r["layer"] is not None else "—"), f"{r['coef']:g}",
                      "—" if r["alpha"] is None else f"{r['alpha']:.2f}", f(r["trait_mean"], r["trait_std"]),
                      f(r["coherence_mean"], r["coherence_std"]), str(r["n"]),
                      *([("—" if r.get("capability") is None else f"{r['capability']:.3f}")] if with_cap else []),
                      *([_num(r.get("guard_touched_mean"), ".1f"), _num(r.get("guard_answers_touched"), ".0%")]
                        if with_guard else []))
    console.print(table)


def _num(x: float | None, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def print_monitor_result(result: MonitorResult) -> None:
    """The monitoring experiments' correlations, then one table of conditions per experiment."""
    def f(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    table = Table(title=f"monitoring {result.trait} on {result.model} (layer {result.layer})")
    for col in ("experiment", "n scored", "r (responses)", "r (condition means)", "paper r"):
        table.add_column(col)
    for res in result.experiments.values():
        table.add_row(res["title"], f"{res['n_scored']}/{res['n']}", with_ci(res["r"], res.get("r_ci")),
                      with_ci(res["r_condition_means"], res.get("r_condition_means_ci")), f(res.get("paper_r")))
    console.print(table)
    for res in result.experiments.values():
        ct = Table(title=res["title"])
        for col in ("condition", "n", "mean projection", "mean trait", "mean coherence", "r within"):
            ct.add_column(col)
        for c in res["conditions"]:
            ct.add_row(c["label"], str(c["n"]), f(c["projection_mean"]),
                       "—" if c["trait_mean"] is None else f"{c['trait_mean']:.1f}",
                       "—" if c["coherence_mean"] is None else f"{c['coherence_mean']:.1f}", f(c["r_within"]))
        console.print(ct)
    console.print(f"report: [bold]{result.files.get('report')}[/] ({result.seconds:.0f} s)")


def print_screen_result(result: ScreenResult, out: Console | None = None) -> None:
    """A rich table of dataset-level ΔP and flag counts per trait."""
    judged = any(r.judge_flagged is not None for r in result.traits.values())
    table = Table(title=f"screening {result.input} ({result.method}, {result.model}): {result.n_screened} rows"
                        + (f", {result.n_malformed} malformed skipped" if result.n_malformed else ""))
    cols = ["vector", "layer", "mean ΔP [95% CI]", "threshold", "flagged (ΔP)"]
    if judged:
        cols += ["flagged (judge ≥ 50)", "both", "judge missing"]
    for col in cols:
        table.add_column(col)
    for r in result.traits.values():
        row = [r.name, str(r.layer), f"{r.mean:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}]" if r.n else "— (no rows)",
               "—" if r.threshold is None else f"{r.threshold:.3f}",
               f"{r.n_flagged} ({r.n_flagged / max(r.n, 1):.1%})"]
        if judged:
            jf = r.judge_flagged or 0
            row += [f"{r.judge_flagged} ({jf / max(r.n, 1):.1%})", str(r.both_flagged),
                    str(r.judge_missing)]
        table.add_row(*row)
    (out or console).print(table)
    if result.n_malformed:
        c = out or console
        for b in result.malformed[:10]:
            c.print(f"[yellow]line {b['line']}: {escape(b['error'])}", highlight=False)
        if result.n_malformed > 10:
            c.print(f"[yellow]… {result.n_malformed - 10} more malformed rows listed in {result.out_dir}/summary.json")
    if result.paths:
        (out or console).print(f"outputs in {result.out_dir}: annotated.jsonl, filtered.jsonl, top_flagged.md, "
                                 "summary.json, histograms")


def print_validity(report: ValidityReport) -> None:
    """The validity checks at the chosen layer, and a warning naming each one that misses its threshold."""
    at = report.at()
    shown = ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in at.items() if v is not None)
    console.print(f"validity at layer {report.layer}: {shown or 'nothing measurable'}")
    for note in report.notes:
        console.print(f"  note: {note}")
    if report.problems():
        console.print(f"[bold yellow]warning:[/] this vector fails the validity checks at layer {report.layer}: "
                      f"{'; '.join(report.problems())} (see validity.png; docs/vectors.md)")


def print_summary(summary: dict) -> None:
    """The extraction's summary: judged scores by side, kept pairs, departures from the paper, the file."""
    table = Table(title=f"persona vector: {summary['trait']} on {summary['model']}")
    table.add_column("")
    table.add_column("pos")
    table.add_column("neg")
    ms = summary["mean_scores"]

    def fmt(x):
        return "—" if x is None else f"{x:.1f}"

    table.add_row("mean trait score", fmt(ms["pos"]["trait"]), fmt(ms["neg"]["trait"]))
    table.add_row("mean coherence", fmt(ms["pos"]["coherence"]), fmt(ms["neg"]["coherence"]))
    console.print(table)
    dropped = ", ".join(f"{k}: {v}" for k, v in summary["dropped"].items()) or "none"
    console.print(f"kept {summary['kept_pairs']}/{summary['pairs']} pairs (dropped: {dropped})")
    for d in summary.get("departures", []):
        console.print(f"  departs from the paper: {d}")
    console.print(f"judge: {summary['judge']} ({summary['judge_modes']['trait']} / "
                  f"{summary['judge_modes']['coherence']})")
    if summary.get("dtype"):
        console.print(f"compute dtype: {summary['dtype']} (a resume must use the same)")
    console.print(f"vector: [bold]{summary['vector']}")


def print_extraction(run_dir: Path) -> None:
    """The summary and the validity report of the extraction written in `run_dir`."""
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    print_summary(summary)
    print_validity(ValidityReport.from_dict(summary["validity"]))
