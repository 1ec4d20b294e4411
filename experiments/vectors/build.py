"""The package's ready-made persona vectors: extract every built-in trait on a built-in model, with validity.

Stages per trait, each resumable (run folders under runs/<trait>-<model>-builtin/):
1. answers under the pos/neg instructions (the `builtin` extraction profile),
2. the probe judge on every answer (refusals drop a pair), the vector and its validity report,
then `experiments/vectors/sweep.py` measures steering and copies the vectors into the package. On 2 CPU cores
stage 1 takes about 8 min per trait and stage 2 about 5.

    python experiments/vectors/build.py [--model qwen2.5-coder-0.5b] [--traits optimistic evil ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from personascope.judges import load_probe_judge
from personascope.model import ModelAdapter, load_model
from personascope.traits import builtin_traits
from personascope.vectors import PROFILES, extract_vector

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--judge-model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--traits", nargs="*", default=builtin_traits())
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    adapter = ModelAdapter(model, tok)
    judge = load_probe_judge(args.judge_model)
    for name in args.traits:
        run = ROOT / "runs" / f"{name}-{args.model}-builtin"
        extract_vector(adapter, name, judge=judge, config=PROFILES["builtin"], run_dir=run)


if __name__ == "__main__":
    main()
