"""The drift run's HTML report: the distribution over all conversations, each flagged trajectory beside its turns."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from .drift_rule import DriftRule


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _value(t: dict, span: str, name: str) -> float | None:
    z = t[f"{span}_z"].get(name)
    return z if z is not None else t[span].get(name)


def _distribution(rows: list[dict], names: list[str], rule: DriftRule) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        scores = [rule.score([_value(t, rule.span, name) for t in r["turns"]]) for r in rows]
        scores = [s for s in scores if s != float("-inf")]
        ax.hist(scores, bins=30, color="tab:blue", alpha=0.8)
        ax.axvline(rule.z, color="tab:red", ls="--", lw=1, label=f"z = {rule.z:g}")
        ax.set_title(f"{name}: highest {rule.turns}-turn mean of {rule.span} z", fontsize=9)
        ax.set_xlabel("z-score")
        ax.set_ylabel("conversations")
        ax.legend(fontsize=7)
    return _png(fig)


def _trajectory(row: dict, names: list[str], rule: DriftRule) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.0))
    xs = [t["turn"] for t in row["turns"]]
    for name in names:
        line = ax.plot(xs, [_value(t, "pre", name) for t in row["turns"]], marker="o", label=f"{name} pre")[0]
        ax.plot(xs, [_value(t, "response", name) for t in row["turns"]], marker="s", ls=":",
                color=line.get_color(), label=f"{name} response")
        if name in row["alerts"]:
            ax.axvline(row["alerts"][name]["turn"], color=line.get_color(), lw=0.8, alpha=0.6)
    ax.axhline(rule.z, color="tab:red", ls="--", lw=0.8)
    ax.set_xlabel("assistant turn")
    ax.set_ylabel("z-score (raw projection where uncalibrated)")
    ax.legend(fontsize=7)
    return _png(fig)


def _turns_html(row: dict) -> str:
    parts = []
    for role, text in zip(row["roles"], row["texts"], strict=True):
        short = text if len(text) <= 600 else text[:600] + " …"
        parts.append(f'<div class="m {role}"><b>{role}</b>: {html.escape(short)}</div>')
    return "\n".join(parts)


STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}
.conv{display:flex;gap:1.5em;border-top:1px solid #ccc;padding:1em 0}.conv img{flex:none}
.turns{font-size:13px;max-height:420px;overflow:auto}.m{margin:.3em 0}.assistant{color:#234}.user{color:#555}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}"""


def write_report(rows: list[dict], summary: dict, rule: DriftRule, path: Path, max_plots: int = 50) -> Path:
    """report.html: counts, the distribution plot and up to `max_plots` flagged conversations."""
    names = list(summary["layers"])
    flagged = [r for r in rows if r["alerts"]]
    head = "".join(f"<tr><td>{html.escape(n)}</td><td>{summary['layers'][n]}</td>"
                   f"<td>{summary['flagged'][n]['n']}</td><td>{'yes' if summary['calibrated'][n] else 'no'}</td></tr>"
                   for n in names)
    body = [f"<h1>Persona drift: {html.escape(str(summary['data']))}</h1>",
            f"<p>{summary['conversations']} conversations, {summary['turns']} assistant turns, "
            f"{len(summary['skipped_lines'])} lines skipped. Model {html.escape(summary['model'])}. "
            f"Rule: {html.escape(rule.describe())}.</p>",
            f"<table><tr><th>vector</th><th>layer</th><th>flagged</th><th>calibrated</th></tr>{head}</table>"]
    if rows:
        body.append(f'<h2>All conversations</h2><img alt="distribution" src="{_distribution(rows, names, rule)}">')
    body.append(f"<h2>Flagged conversations ({len(flagged)}"
                f"{f', first {max_plots} shown' if len(flagged) > max_plots else ''})</h2>")
    for r in flagged[:max_plots]:
        why = "; ".join(f"{n}: {a['reason']} at turn {a['turn']} ({a['value']:.2f})" for n, a in r["alerts"].items())
        body.append(f'<div class="conv" id="{html.escape(r["id"])}"><div><h3>{html.escape(r["id"])} '
                    f'(line {r["line"]})</h3><p>{html.escape(why)}</p><img alt="trajectory" '
                    f'src="{_trajectory(r, names, rule)}"></div><div class="turns">{_turns_html(r)}</div></div>')
    if summary["skipped_lines"]:
        items = "".join(f"<li>line {e['line']}: {html.escape(e['error'])}</li>" for e in summary["skipped_lines"])
        body.append(f"<h2>Skipped lines</h2><ul>{items}</ul>")
    text = (f"<!doctype html><html><head><meta charset='utf-8'><title>persona drift</title><style>{STYLE}</style>"
            f"</head><body>{''.join(body)}</body></html>")
    path.write_text(text, encoding="utf-8")
    return path
