"""The screening report: per-trait statistics, annotated and filtered rows, top lists, histograms, tables."""

from __future__ import annotations

import csv
import heapq
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from personascope.model import question_of
from personascope.util import write_json

from .score import JUDGE_THRESHOLD, BadRow, Direction, csv_fields, is_csv, iter_deltas, read_rows
from .types import PassResult, ScreenConfig

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- statistics


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (resampled in blocks so memory stays bounded)."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    if n == 1:
        return float(values[0]), float(values[0])
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    step = max(1, 250_000 // n)
    for s in range(0, n_boot, step):
        k = min(step, n_boot - s)
        means[s : s + k] = values[rng.integers(0, n, size=(k, n))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


# ---------------------------------------------------------------- the whole screening


@dataclass
class TraitReport:
    """Dataset-level ΔP and flags of one vector."""

    name: str
    trait: str
    layer: int
    n: int
    mean: float
    ci_low: float
    ci_high: float
    threshold: float | None
    threshold_source: str
    n_flagged: int
    reference_mean: float | None = None
    judge_flagged: int | None = None
    judge_missing: int | None = None
    judge_mean: float | None = None
    both_flagged: int | None = None


@dataclass
class ScreenResult:
    """What a screening run found; the files it wrote are listed in `paths`."""

    out_dir: str
    input: str
    method: str
    model: str
    n_rows: int
    n_screened: int
    n_malformed: int
    malformed: list[dict]
    traits: dict[str, TraitReport]
    seconds: float
    samples_per_s: float | None
    paths: dict[str, str] = field(default_factory=dict)
    lines: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # line of each screened row
    delta_p: dict[str, np.ndarray] = field(default_factory=dict)  # per vector, aligned with `lines`
    judge_scores: dict[str, np.ndarray] = field(default_factory=dict)  # NaN where the judge gave no score

    def summary(self) -> dict:
        """The JSON-able summary (per-row arrays left out)."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("lines", "delta_p", "judge_scores")}
        d["traits"] = {name: asdict(t) for name, t in self.traits.items()}
        return d


def build_report(adapter, path: Path, out: Path, dirs: dict[str, Direction], cfg: ScreenConfig, data: PassResult,
            ref: PassResult | None, th: dict, judged: bool, top: int, filter_by: str, plots: bool) -> ScreenResult:
    names = list(dirs)
    traits = {}
    for k, d in dirs.items():
        vals = data.delta[k]
        lo, hi = bootstrap_ci(vals, cfg.n_boot, seed=cfg.seed)
        t, src = th[k]
        rep = TraitReport(k, d.trait, d.layer, len(vals), float(vals.mean()) if len(vals) else float("nan"), lo, hi,
                          t, src, int((vals > t).sum()) if t is not None else 0,
                          reference_mean=float(ref.delta[k].mean()) if ref is not None and len(ref.delta[k]) else None)
        if judged:
            js = data.judge[k]
            jflag = js >= JUDGE_THRESHOLD
            rep.judge_flagged = int(jflag.sum())
            rep.judge_missing = int(np.isnan(js).sum())
            rep.judge_mean = float(np.nanmean(js)) if rep.judge_missing < len(js) else None
            rep.both_flagged = int((jflag & (vals > t)).sum()) if t is not None else 0
        traits[k] = rep
    paths = _write_rows(path, out, names, data, th, judged, top, filter_by)
    if plots:
        for k in names:
            paths[f"histogram_{k}"] = str(plot_histogram(data.delta[k], ref.delta[k] if ref is not None else None,
                                                         th[k][0], out / f"hist_{_safe(k)}.png",
                                                         f"ΔP {k} (layer {dirs[k].layer}, {cfg.method})"))
    malformed = [asdict(b) for b in data.malformed]
    result = ScreenResult(
        out_dir=str(out), input=str(path), method=cfg.method, model=adapter.name, n_rows=data.n_rows,
        n_screened=len(data.lines), n_malformed=data.n_malformed, malformed=malformed, traits=traits,
        seconds=data.seconds, samples_per_s=(data.screened_now / data.seconds) if data.screened_now else None,
        paths=paths, lines=data.lines, delta_p=data.delta, judge_scores=data.judge,
    )
    paths["summary"] = str(out / "summary.json")
    summary = result.summary()
    summary["config"] = asdict(cfg)
    summary["vectors"] = {k: {"trait": d.trait, "layer": d.layer, "path": d.source} for k, d in dirs.items()}
    if data.n_malformed > len(malformed):
        summary["malformed_note"] = f"first {len(malformed)} of {data.n_malformed} listed"
    write_json(out / "summary.json", summary)
    return result


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _write_rows(path: Path, out: Path, names: list[str], data: PassResult, th: dict, judged: bool, top: int,
                filter_by: str) -> dict[str, str]:
    """annotated.jsonl, filtered.jsonl (and .csv for CSV input) and top_flagged.md, in one streaming pass."""
    heaps: dict[str, list] = {k: [] for k in names}
    csv_in = is_csv(path)
    fcsv = None
    paths = {"annotated": str(out / "annotated.jsonl"), "filtered": str(out / "filtered.jsonl"),
             "top_flagged": str(out / "top_flagged.md")}
    deltas = iter_deltas(out / "deltas.jsonl")
    with (out / "annotated.jsonl").open("w") as fa, (out / "filtered.jsonl").open("w") as ff:
        if csv_in:
            fcsv_file = (out / "filtered.csv").open("w", newline="")
            fcsv = csv.DictWriter(fcsv_file, fieldnames=csv_fields(path), extrasaction="ignore")
            fcsv.writeheader()
            paths["filtered_csv"] = str(out / "filtered.csv")
        try:
            for row in read_rows(path):
                rec = next(deltas, None)
                if rec is None or rec["line"] != row.line:
                    raise ValueError(f"{out / 'deltas.jsonl'} does not match {path} at line {row.line}: the input "
                                     "changed since it was screened; rerun with force")
                if isinstance(row, BadRow) or "error" in rec:
                    continue
                flags = {k: th[k][0] is not None and rec["delta_p"][k] > th[k][0] for k in names}
                screen = {**rec, "flagged": flags}
                if judged:
                    screen["judge_flagged"] = {k: (rec["judge"][k] or 0) >= JUDGE_THRESHOLD
                                               if rec["judge"].get(k) is not None else False for k in names}
                fa.write(json.dumps({**row.record, "screen": screen}, ensure_ascii=False) + "\n")
                drop = {"delta_p": any(flags.values()), "judge": any(screen.get("judge_flagged", {}).values()),
                        "any": any(flags.values()) or any(screen.get("judge_flagged", {}).values())}[filter_by]
                if not drop:
                    ff.write((row.raw if row.raw is not None else json.dumps(row.record, ensure_ascii=False)) + "\n")
                    if fcsv is not None:
                        fcsv.writerow(row.record)
                for k in names:
                    item = (rec["delta_p"][k], -row.line, row.line, question_of(row.messages)[:300],
                            row.response[:500], (rec.get("model_answer") or "")[:300], flags[k],
                            (rec.get("judge") or {}).get(k))
                    if len(heaps[k]) < top:
                        heapq.heappush(heaps[k], item)
                    else:
                        heapq.heappushpop(heaps[k], item)
        finally:
            if fcsv is not None:
                fcsv_file.close()
    _write_top(out / "top_flagged.md", path, names, heaps, th, judged)
    return paths


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip()


def _write_top(path: Path, src: Path, names: list[str], heaps: dict, th: dict, judged: bool) -> None:
    lines = [f"# Highest ΔP samples in {src}", ""]
    for k in names:
        t, why = th[k]
        lines += [f"## {k}", "", f"threshold: {'—' if t is None else f'{t:.3f}'} ({why})", ""]
        head = ("| rank | line | ΔP | flagged |" + (" judge |" if judged else "")
                + " prompt | response | model's answer |")
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for rank, it in enumerate(sorted(heaps[k], reverse=True), 1):
            dp, _, line, q, resp, mine, flag, js = it
            judge_cell = (f" {'—' if js is None else f'{js:.0f}'} |" if judged else "")
            lines.append(f"| {rank} | {line} | {dp:.3f} | {'yes' if flag else ''} |{judge_cell} {_cell(q)} | "
                         f"{_cell(resp)} | {_cell(mine)} |")
        lines.append("")
    path.write_text("\n".join(lines))


def plot_histogram(values: np.ndarray, reference: np.ndarray | None, threshold: float | None, path: Path,
                   title: str) -> Path:
    """ΔP histogram of the data (and the reference), with the flagging threshold drawn."""
    import matplotlib.pyplot as plt

    from personascope.util import save_figure

    fig, ax = plt.subplots(figsize=(6, 3.6))
    allv = np.concatenate([values, reference]) if reference is not None and len(reference) else values
    bins = np.histogram_bin_edges(allv, bins=min(40, max(5, int(math.sqrt(max(len(allv), 1)))))) if len(allv) else 10
    if reference is not None and len(reference):
        ax.hist(reference, bins=bins, alpha=0.5, color="tab:blue", label=f"reference (n={len(reference)})")
    ax.hist(values, bins=bins, alpha=0.6, color="tab:red", label=f"data (n={len(values)})")
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:.2f}")
    ax.set_xlabel("ΔP (projection difference)")
    ax.set_ylabel("samples")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return save_figure(fig, Path(path))


