"""Steering files for lm-evaluation-harness's `steered` model type (capability cost on MMLU & co).

The harness loads a torch file `{hookpoint: {steering_vector, steering_coefficient, action, bias,
head_index}}`, where a hookpoint is a module name inside `model.base_model`; with action `add` it
adds `coef · vector` to that module's output at every position. Our row l is the output of block
l - 1, so it goes to the hookpoint of that block (e.g. `layers.{l-1}` for Llama/Qwen, `h.{l-1}` for GPT-2).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

import torch

from personascope.model import ModelAdapter
from personascope.vectors import PersonaVector

from .formats import EVERY_POSITION_WARNING, ControlVectorError, LayerChoice


@dataclass
class LmEvalExport:
    """What `export_lmeval` wrote: the hookpoint and raw coefficient of each row."""

    path: Path
    hookpoints: dict[int, str]  # row -> module name inside model.base_model
    coefs: dict[int, float]
    warnings: list[str]

    def command(self, pretrained: str, tasks: str = "mmlu", batch_size: str = "auto") -> str:
        """The `lm_eval` command line that evaluates `pretrained` steered by this file."""
        args = f"pretrained={pretrained},steer_path={self.path}"
        return (f"lm_eval --model steered --model_args {shlex.quote(args)} --tasks {tasks} "
                f"--batch_size {batch_size}")


def block_hookpoints(adapter: ModelAdapter) -> list[str]:
    """The name of each decoder block inside `model.base_model`, as the harness resolves hookpoints."""
    base = adapter.model.base_model
    names = {id(m): n for n, m in base.named_modules()}
    out = []
    for i, block in enumerate(adapter.blocks):
        if id(block) not in names:
            raise ControlVectorError(f"block {i} of {adapter.name} is not inside model.base_model, so "
                                     "lm-evaluation-harness cannot hook it")
        out.append(names[id(block)])
    return out


def export_lmeval(pv: PersonaVector, adapter: ModelAdapter, out: str | Path, choice: LayerChoice,
                  span: str = "response_avg") -> LmEvalExport:
    """Write a steering file for `lm_eval --model steered`: row l with its coefficient on block l - 1."""
    pv.check(adapter)
    names = block_hookpoints(adapter)
    config: dict[str, dict] = {}
    hookpoints: dict[int, str] = {}
    for r in choice.rows:
        if r < 1:
            raise ControlVectorError("layer 0 (the embedding output) has no block output to hook; use layers >= 1")
        hp = names[r - 1]
        hookpoints[r] = hp
        config[hp] = {
            "steering_vector": pv.vector(r, span).float().clone(),
            "steering_coefficient": float(choice.coefs[r]),
            "action": "add",
            "bias": None,
            "head_index": None,
        }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(config, out)
    return LmEvalExport(out, hookpoints, dict(choice.coefs), [EVERY_POSITION_WARNING.replace("llama.cpp (and "
                                                               "repeng / EasySteer) add", "the harness adds")])
