"""Measure steering for each ready-made vector and copy it, with the measurement, into the package.

For every trait whose run folder holds a vector (experiments/vectors/build.py): the unsteered model and
steering at the validity-chosen layer at ±α answer the trait's first evaluation questions greedily; the probe
judge scores them; per direction the strongest α whose answers pass the fluency gate (≥ 90 % flagged fluent by
judges.fluency) is stored in the vector's metadata (`steering`), and the vector goes to
src/personascope/data/vectors/<model>/<trait>.safetensors.

    python experiments/vectors/sweep.py [--model qwen2.5-coder-0.5b] [--traits ...] [--alphas -1 -0.5 0.5 1]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from personascope.evaluation import Condition, EvalConfig, choose_steering, evaluate
from personascope.judges import ProbeJudge, ProbeWeights, load_probe_judge, probe_weights_path
from personascope.model import ModelAdapter, SamplingConfig, load_model
from personascope.traits import builtin_traits, load_trait
from personascope.vectors import load_vector

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "personascope" / "data" / "vectors"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--traits", nargs="*", default=builtin_traits())
    ap.add_argument("--alphas", nargs="*", type=float, default=[-1.0, -0.75, -0.5, -0.25, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--judge-model", default=None,
                    help="the probe judge's model (default: the subject model when the package has its probe, "
                         "else qwen2.5-coder-0.5b)")
    ap.add_argument("--questions", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    adapter = ModelAdapter(model, tok)
    judge_model = args.judge_model or (args.model if probe_weights_path(args.model).exists() else "qwen2.5-coder-0.5b")
    judge = load_probe_judge(judge_model) if judge_model != args.model else ProbeJudge(
        adapter, ProbeWeights.load(probe_weights_path(args.model)), name=f"probe:{args.model}")
    cfg = EvalConfig(SamplingConfig(samples=1, temperature=0.0, max_new_tokens=args.max_new_tokens,
                                    batch_size=args.questions), n_questions=args.questions)
    for name in args.traits:
        run = ROOT / "runs" / f"{name}-{args.model}-builtin"
        source = run / "vector.safetensors"
        if not source.exists():  # re-sweep the shipped vector (the build's run folder is not kept in git)
            source = PACKAGE / args.model / f"{name}.safetensors"
        if not source.exists():
            print(f"skip {name}: no vector in {run} or the package")
            continue
        pv = load_vector(source)
        layer = pv.default_layer()
        conds = [Condition()] + [Condition(layer, pv.coef_from_alpha(a, layer), "response") for a in args.alphas]
        rows = evaluate(adapter, load_trait(name), judge, conds, run / "sweep-fluency", vector=pv, cfg=cfg)
        choice = choose_steering(rows)
        steering = {
            "layer": layer, "judge": judge.name, "questions": args.questions, "max_new_tokens": args.max_new_tokens,
            "alpha_plus": choice["plus"] and choice["plus"]["alpha"],
            "alpha_minus": choice["minus"] and choice["minus"]["alpha"],
            "delta_plus": choice["plus"] and choice["plus"]["delta"],
            "delta_minus": choice["minus"] and choice["minus"]["delta"],
            "base_trait": choice["base_trait"], "base_coherence": choice["base_coherence"],
            "coherence_gate": choice["coherence_gate"], "min_fluent": choice["min_fluent"],
            "sweep": [{"alpha": r["alpha"], "trait": r["trait_mean"], "coherence": r["coherence_mean"],
                       "fluent_share": r["fluent_share"]} for r in rows],
        }
        out = PACKAGE / args.model / f"{name}.safetensors"
        pv.with_metadata(steering=json.dumps(steering)).save(out)
        print(name, json.dumps({k: v for k, v in steering.items() if k != "sweep"}), flush=True)
        for r in rows:
            print(f"  α {r['alpha'] if r['alpha'] is not None else 0:+.2f}: trait {r['trait_mean']:.1f} "
                  f"coherence {r['coherence_mean']:.1f} fluent {r['fluent_share']:.0%}", flush=True)


if __name__ == "__main__":
    main()
