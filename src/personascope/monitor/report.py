"""The monitoring report: scatter and r-by-layer plots, token heatmaps, monitor.json, report.html, tables."""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from personascope.judges import Judge
from personascope.model import ModelAdapter
from personascope.traits import Trait
from personascope.util import format_ci, save_figure, write_json
from personascope.vectors import PersonaVector

from .types import MonitorConfig

log = logging.getLogger(__name__)


def truncate(text: str, n: int | None) -> str:
    if n is None or len(text) <= n:
        return text
    cut = text[:n].rsplit(" ", 1)[0]
    return (cut or text[:n]).rstrip() + " …"


def plot_monitor(exps: dict[str, dict], records: list[dict], layer: int, path: Path, title: str) -> Path:
    """Scatter of last-prompt-token projection against trait score, one panel per experiment, with r."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(exps), figsize=(5.6 * len(exps), 4.4), squeeze=False)
    for ax, (e, res) in zip(axes[0], exps.items(), strict=True):
        recs = [r for r in records if r["experiment"] == e and r["trait_score"] is not None]
        conds = [c["condition"] for c in res["conditions"]]
        cmap = plt.get_cmap("coolwarm", max(len(conds), 2))
        for i, c in enumerate(res["conditions"]):
            pts = [r for r in recs if r["condition"] == c["condition"]]
            ax.scatter([r["prompt_projection"][layer] for r in pts], [r["trait_score"] for r in pts], s=18,
                       color=cmap(i), alpha=0.75, label=c["label"] if e == "shots" else f"rung {c['condition']}")
            if c["projection_mean"] is not None and c["trait_mean"] is not None:
                ax.scatter([c["projection_mean"]], [c["trait_mean"]], s=90, marker="D", color=cmap(i),
                           edgecolor="k", linewidth=0.8)
        xs = [r["prompt_projection"][layer] for r in recs]
        ys = [r["trait_score"] for r in recs]
        if len(xs) >= 3 and max(xs) > min(xs):
            mx, my = statistics.fmean(xs), statistics.fmean(ys)
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
            ax.plot([min(xs), max(xs)], [my + slope * (min(xs) - mx), my + slope * (max(xs) - mx)], "k--", lw=1)
        paper = res.get("paper_r")
        r_txt = with_ci(res["r"], res.get("r_ci"))
        ax.set_title(f"{res['title']}: r = {r_txt} (paper: {'n/a' if paper is None else paper})", fontsize=10)
        ax.set_xlabel(f"projection of last prompt token on v̂ (layer {layer})")
        ax.set_ylabel("judged trait score")
        ax.set_ylim(-3, 103)
        ax.legend(fontsize=7, loc="best", title="◆ condition mean", title_fontsize=7)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


def plot_r_by_layer(exps: dict[str, dict], layer: int, path: Path, title: str) -> Path:
    """Pearson r of the last-prompt-token projection with the trait score at every layer."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for res in exps.values():
        rs = res["r_by_layer"]
        ax.plot(range(len(rs)), [float("nan") if r is None else r for r in rs], marker="o", ms=3, label=res["title"])
    ax.axvline(layer, color="k", ls=":", lw=0.8, label=f"layer used ({layer})")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("layer")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("Pearson r (projection vs trait)")
    ax.set_ylim(-1, 1)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def pick_examples(records: list[dict], n: int) -> list[dict]:
    """Answers worth looking at: the most and least trait-like of each experiment, then the extremes' first."""
    picked: list[dict] = []
    for e in ("system", "shots"):
        recs = [r for r in records if r["experiment"] == e and r.get("trait_score") is not None and r.get("tokens")]
        recs.sort(key=lambda r: r["trait_score"])
        for r in (recs[-1:] + recs[:1]) if recs else []:
            if r not in picked:
                picked.append(r)
    rest = sorted((r for r in records if r.get("tokens") and r not in picked),
                  key=lambda r: -abs(r["prompt_projection"][r["trace_layer"]]))
    return (picked + rest)[:n]


def write_report(out: Path, trait: Trait, adapter: ModelAdapter, judge: Judge, vector: PersonaVector, layer: int,
                 cfg: MonitorConfig, exps: dict[str, dict], records: list[dict], ladder: Sequence[str] | None,
                 pool: Sequence[tuple[str, str]], t0: float, screenshot: bool) -> dict[str, str]:
    """monitor.json, scatter / r-by-layer PNGs, heatmap.html (+ .png when Chromium exists), report.html."""
    from .heatmap import HeatmapItem, render_heatmap, report_html, screenshot_html

    title = f"{trait.name} on {adapter.name}, layer {layer} (judge {judge.name}, {judge.mode_for('trait')})"
    files = {
        "scatter": str(plot_monitor(exps, records, layer, out / "scatter.png", f"monitoring {title}")),
        "r_by_layer": str(plot_r_by_layer(exps, layer, out / "r_by_layer.png", f"monitoring r by layer: {trait.name}")),
    }
    examples = pick_examples(records, cfg.examples)
    items = [HeatmapItem(tokens=r["tokens"], values=r["trace"],
                         title=f"{r['label']} · Q{r['question']}: {r['question_text']}",
                         note=f"last prompt token {r['projection']:.2f} · judged trait "
                              + ("—" if r["trait_score"] is None else f"{r['trait_score']:.0f}"),
                         prompt_value=r["projection"]) for r in examples]
    if items:
        files["heatmap"] = str(render_heatmap(items, out / "heatmap.html",
                                              title=f"per-token projection on the {trait.name} vector "
                                                    f"(layer {layer})"))
        if screenshot:
            png = screenshot_html(out / "heatmap.html", out / "heatmap.png")
            if png is not None:
                files["heatmap_png"] = str(png)
    summary = {
        "trait": trait.name, "model": adapter.name, "vector": vector.path, "layer": layer, "judge": judge.name,
        "judge_modes": {"trait": judge.mode_for("trait"), "coherence": judge.mode_for("coherence")},
        "config": asdict(cfg), "seconds": round(time.time() - t0, 1), "ladder": list(ladder or []),
        "rendered_example_prompt": records[0]["prompt"] if records else None,
        "shot_examples": [{"question": q, "answer": truncate(a, cfg.shot_chars)} for q, a in
                          list(pool)[: max(cfg.shots, default=0)]],
        "experiments": exps, "files": files,
    }
    write_json(out / "monitor.json", summary)
    files["json"] = str(out / "monitor.json")
    files["report"] = str(report_html(out / "report.html", summary, items))
    write_json(out / "monitor.json", {**summary, "files": files})
    return files


def with_ci(x: float | None, ci: Sequence[float] | None) -> str:
    """'0.812 [0.70, 0.90]' (bootstrap 95 % interval), or 'n/a'."""
    if x is None:
        return "n/a"
    return f"{x:.3f}" + format_ci(ci)


