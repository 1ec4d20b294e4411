"""Stage 1 of the ready-made vectors: pos/neg answers for every built-in trait (resumable)."""
import sys
from pathlib import Path

import torch

from personascope.adapter import ModelAdapter
from personascope.extract import PROFILES, generate_answers
from personascope.models import load_model
from personascope.traits import load_trait

torch.set_num_threads(2)
model = sys.argv[1] if len(sys.argv) > 1 else "qwen2.5-coder-0.5b"
traits = ["optimistic", "evil", "sycophantic", "hallucinating", "impolite", "apathetic", "humorous"]
m, tok = load_model(model)
adapter = ModelAdapter(m, tok)
cfg = PROFILES["builtin"]
for name in traits:
    run = Path("runs") / f"{name}-{model}-builtin"
    run.mkdir(parents=True, exist_ok=True)
    generate_answers(adapter, load_trait(name), run, cfg)
    print("done", name, flush=True)
