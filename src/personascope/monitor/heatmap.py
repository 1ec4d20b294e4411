"""Self-contained HTML heat maps of per-token projections (no server, no scripts, no external files).

Each answer token is a `<span>` coloured on a diverging scale (blue below the centre, red above)
with its value in a tooltip. `report_html` wraps the monitoring results (tables, embedded PNGs and
heat maps) in one file; `screenshot_html` renders a file in headless Chromium when one is installed.
"""

from __future__ import annotations

import base64
import html
import shutil
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from personascope.util import format_ci

LOW = (33, 102, 172)  # RdBu blue
HIGH = (178, 24, 43)  # RdBu red
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@dataclass
class HeatmapItem:
    """One answer to draw: its tokens (strings) and one value per token."""

    tokens: list[str]
    values: list[float]
    title: str = ""
    note: str = ""
    prompt_value: float | None = None


def diverging(value: float, center: float, scale: float) -> tuple[str, str]:
    """(background, text) colours for a value: white at `center`, full blue/red at center ∓ scale."""
    t = 0.0 if scale <= 0 else max(-1.0, min(1.0, (value - center) / scale))
    end = HIGH if t > 0 else LOW
    a = abs(t)
    rgb = tuple(round(255 + (c - 255) * a) for c in end)
    return "#{:02x}{:02x}{:02x}".format(*rgb), "#ffffff" if a > 0.65 else "#111111"


def color_scale(values: Sequence[float], center: float | None = None, scale: float | None = None
                ) -> tuple[float, float]:
    """Centre (default: the median) and half-width (default: the 95th percentile of |v − centre|)."""
    vals = [float(v) for v in values]
    if center is None:
        center = statistics.median(vals) if vals else 0.0
    if scale is None:
        dev = sorted(abs(v - center) for v in vals)
        scale = dev[min(len(dev) - 1, int(0.95 * len(dev)))] if dev else 1.0
    return center, scale or 1.0


CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 24px; color: #111; max-width: 1100px; }
h1 { font-size: 20px; } h2 { font-size: 17px; margin-top: 28px; } h3 { font-size: 14px; margin: 18px 0 4px; }
.note { color: #555; font-size: 12px; margin-bottom: 6px; }
.answer { font-family: ui-monospace, 'DejaVu Sans Mono', monospace; font-size: 14px; line-height: 1.9;
          white-space: pre-wrap; word-break: break-word; border: 1px solid #ddd; border-radius: 6px; padding: 10px; }
.tok { position: relative; border-radius: 3px; padding: 1px 0; }
.tok:hover { outline: 1px solid #000; }
.tok:hover::after { content: attr(data-v); position: absolute; left: 0; top: -1.9em; background: #222; color: #fff;
                    font-size: 11px; padding: 1px 5px; border-radius: 3px; white-space: pre; z-index: 2; }
.legend { display: flex; align-items: center; gap: 8px; font-size: 12px; margin: 8px 0 16px; }
.bar { width: 260px; height: 12px; border: 1px solid #ccc;
       background: linear-gradient(to right, rgb(33,102,172), #ffffff, rgb(178,24,43)); }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
img { max-width: 100%; border: 1px solid #eee; }
details { margin: 8px 0; font-size: 13px; }
"""


def _legend(center: float, scale: float) -> str:
    return (f'<div class="legend"><span>{center - scale:.2f}</span><div class="bar"></div>'
            f'<span>{center + scale:.2f}</span><span class="note">projection on v̂ (centre {center:.2f}; '
            f'hover a token for its value)</span></div>')


def answer_html(item: HeatmapItem, center: float, scale: float) -> str:
    """One answer as coloured token spans (text escaped, whitespace kept)."""
    spans = []
    for tok, v in zip(item.tokens, item.values, strict=True):
        bg, fg = diverging(v, center, scale)
        label = html.escape(f"{v:+.3f}  {tok!r}", quote=True)
        spans.append(f'<span class="tok" style="background:{bg};color:{fg}" title="{label}" data-v="{label}">'
                     f"{html.escape(tok)}</span>")
    return f'<div class="answer">{"".join(spans)}</div>'


def heatmap_body(items: Sequence[HeatmapItem], center: float | None = None, scale: float | None = None) -> str:
    """Legend plus every answer, all on one shared colour scale."""
    center, scale = color_scale([v for it in items for v in it.values], center, scale)
    parts = [_legend(center, scale)]
    for it in items:
        if it.title:
            parts.append(f"<h3>{html.escape(it.title)}</h3>")
        if it.note:
            parts.append(f'<div class="note">{html.escape(it.note)}</div>')
        parts.append(answer_html(it, center, scale))
    return "\n".join(parts)


def page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head>\n<body>\n<h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")


def render_heatmap(items: HeatmapItem | Sequence[HeatmapItem], path: str | Path, title: str = "per-token projection",
                   center: float | None = None, scale: float | None = None) -> Path:
    """Write one self-contained HTML file with the answers' tokens coloured by their projections."""
    items = [items] if isinstance(items, HeatmapItem) else list(items)
    for it in items:
        if len(it.tokens) != len(it.values):
            raise ValueError(f"{len(it.tokens)} tokens but {len(it.values)} values")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page(title, heatmap_body(items, center, scale)), encoding="utf-8")
    return path


def _img(path: str | Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(Path(path).name)}" src="data:image/png;base64,{data}">'


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def report_html(path: str | Path, summary: dict, items: Sequence[HeatmapItem]) -> Path:
    """The monitoring report: r next to the paper's, the plots, per-condition tables and example heat maps."""
    exps = summary["experiments"]
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(res['title'])}</td><td>{res['n_scored']}/{res['n']}</td>"
        f"<td><b>{_fmt(res['r'])}</b>{format_ci(res.get('r_ci'))}</td>"
        f"<td>{_fmt(res['r_condition_means'])}{format_ci(res.get('r_condition_means_ci'))}</td>"
        f"<td>{_fmt(res.get('paper_r'))}</td></tr>"
        for res in exps.values())
    body = [
        f"<p>model <b>{e(summary['model'])}</b> · vector <code>{e(str(summary['vector']))}</code> · layer "
        f"<b>{summary['layer']}</b> · judge {e(summary['judge'])} ({e(summary['judge_modes']['trait'])}) · "
        f"{summary['seconds']:.0f} s</p>",
        "<h2>Pearson r: projection of the last prompt token vs judged trait score</h2>",
        "<table><tr><th>experiment</th><th>scored</th><th>r (all answers)</th><th>r (condition means)</th>"
        f"<th>paper r</th></tr>{rows}</table>",
        '<p class="note">Paper figures: Qwen2.5-7B-Instruct / Llama-3.1-8B-Instruct with a GPT-4.1-mini judge'
        "; n/a where the paper reports none for this trait.</p>",
    ]
    files = summary.get("files", {})
    for key in ("scatter", "r_by_layer"):
        if files.get(key) and Path(files[key]).exists():
            body.append(_img(files[key]))
    for res in exps.values():
        body.append(f"<h2>{e(res['title'])}: per condition</h2>")
        trs = "".join(
            f"<tr><td>{e(str(c['label']))}</td><td>{c['n']}</td><td>{_fmt(c['projection_mean'])}</td>"
            f"<td>{_fmt(c['trait_mean'], 1)}</td><td>{_fmt(c['coherence_mean'], 1)}</td><td>{_fmt(c['r_within'])}"
            f"</td><td>{e(c['system'] or '(none: template default)')}</td></tr>" for c in res["conditions"])
        body.append("<table><tr><th>condition</th><th>n</th><th>mean projection</th><th>mean trait</th>"
                    f"<th>mean coherence</th><th>r within</th><th>system prompt</th></tr>{trs}</table>")
    if items:
        body.append("<h2>Per-token projection of example answers</h2>")
        body.append(heatmap_body(items))
    if summary.get("rendered_example_prompt"):
        body.append("<details><summary>one rendered prompt (what the model really saw)</summary><pre>"
                    f"{e(summary['rendered_example_prompt'])}</pre></details>")
    if summary.get("shot_examples"):
        shots = "".join(f"<li><b>{e(s['question'])}</b><br>{e(s['answer'])}</li>" for s in summary["shot_examples"])
        body.append(f"<details><summary>in-context examples (many-shot)</summary><ol>{shots}</ol></details>")
    cfg = e(str(summary.get("config", {})))
    body.append(f"<details><summary>configuration</summary><pre>{cfg}</pre></details>")
    path = Path(path)
    path.write_text(page(f"monitoring {summary['trait']}", "\n".join(body)), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- headless rendering


def find_chromium() -> str | None:
    """A Chromium (or Chrome) executable, or None."""
    if Path("/usr/bin/chromium").exists():
        return "/usr/bin/chromium"
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def screenshot_html(html_path: str | Path, png_path: str | Path, width: int = 1100) -> Path | None:
    """Render an HTML file in headless Chromium and save a full-page PNG; None when no browser is available."""
    exe = find_chromium()
    if exe is None:
        return None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            pg = browser.new_page(viewport={"width": width, "height": 800})
            pg.goto(Path(html_path).resolve().as_uri())
            pg.screenshot(path=str(png_path), full_page=True)
        finally:
            browser.close()
    return png_path
