"""The table and figure of the ready-made vectors: validity at the chosen layer and the measured steering.

Reads the vectors in src/personascope/data/vectors/MODEL/ (experiments/vectors/sweep.py writes them) and writes
experiments/results/vectors/report-MODEL.md and docs/vectors-validity-MODEL.png (every check per layer, per trait).

    python experiments/vectors/report.py [--model qwen2.5-coder-0.5b]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib.pyplot as plt

from personascope.util import save_figure
from personascope.vectors import THRESHOLDS, ValidityReport, load_vector, packaged_vectors

ROOT = Path(__file__).resolve().parents[2]


def fmt(x, signed: bool = False) -> str:
    if x is None:
        return "—"
    return f"{x:+.1f}" if signed else f"{x:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    args = ap.parse_args()
    found = [(t, f) for m, t, f in packaged_vectors() if m == args.model]
    t = THRESHOLDS
    lines = [f"# Ready-made persona vectors on {args.model}", "",
             f"Validity at the chosen layer (thresholds: held-out AUROC ≥ {t.held_out_auroc}, split-half cosine ≥ "
             f"{t.split_half_cosine}, ladder Spearman ≥ {t.ladder_spearman}, label AUROC ≥ {t.label_auroc}; — = not "
             "measurable) and steering at that layer (greedy answers to the first evaluation questions, probe "
             "judge; Δ = judged trait minus the unsteered model's; per direction the strongest α whose answers are "
             "≥ 90 % flagged fluent by the fluency measure, judges.fluency).", "",
             "| trait | pairs | layer | held-out AUROC | split-half cos | ladder ρ | label AUROC | label ρ | valid "
             "| unsteered trait / coh. | +α: Δ trait (coh., fluent) | −α: Δ trait (coh., fluent) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fig, axes = plt.subplots(1, len(found), figsize=(3.2 * len(found), 3), sharey=True, squeeze=False)
    for ax, (trait, path) in zip(axes[0], found, strict=True):
        pv = load_vector(path)
        rep = ValidityReport.from_dict(json.loads(pv.metadata["validity"]))
        at = rep.at()
        st = json.loads(pv.metadata.get("steering", "{}"))

        def side(name: str, st=st) -> str:
            alpha, delta = st.get(f"alpha_{name}"), st.get(f"delta_{name}")
            if alpha is None:
                return "no fluent α moves it"
            pt = next((r for r in st["sweep"] if r["alpha"] == alpha), {})
            share = pt.get("fluent_share")
            fl = "" if share is None else f", fluent {share:.0%}"
            return f"α {alpha:+.2g}: {fmt(delta, True)} (coh. {pt.get('coherence', 0):.0f}{fl})"

        base = (f"{st['base_trait']:.1f} / {st['base_coherence']:.1f}" if st else "—")
        lines.append(f"| {trait} | {pv.metadata.get('kept_pairs')} | {rep.layer} | {fmt(at['held_out_auroc'])} | "
                     f"{fmt(at['split_half_cosine'])} | {fmt(at['ladder_spearman'])} | {fmt(at['label_auroc'])} | "
                     f"{fmt(at['label_spearman'])} | {'yes' if rep.valid else 'no: ' + '; '.join(rep.problems())} | "
                     f"{base} | {side('plus') if st else '—'} | {side('minus') if st else '—'} |")
        for name, curve in rep.curves().items():
            if curve is not None:
                ax.plot(rep.layers, [float("nan") if v is None else v for v in curve], lw=1.2,
                        label=name.replace("_", " "))
        ax.axvline(rep.layer, color="k", ls="--", lw=0.8)
        ax.set(title=trait, xlabel="layer", ylim=(-1.02, 1.02))
    axes[0][0].legend(fontsize=6, loc="lower left")
    fig.suptitle(f"validity of the ready-made vectors on {args.model} (dashed: chosen layer)")
    png = save_figure(fig, ROOT / "docs" / f"vectors-validity-{args.model}.png")
    lines += ["", f"![validity per layer](../../../docs/{png.name})"]
    out = ROOT / "experiments" / "results" / "vectors" / f"report-{args.model}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
