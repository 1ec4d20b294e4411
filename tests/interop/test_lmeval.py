"""lm-evaluation-harness `steered` model: our steering file, run by the harness on a tiny local task and model."""

import json

import pytest
import torch
from tiny import tiny_pair

from personascope.interop.formats import ControlVectorError, LayerChoice
from personascope.interop.lmeval import block_hookpoints, export_lmeval
from personascope.model.adapter import ModelAdapter
from personascope.steering.steer import Steerer
from personascope.vectors.file import PersonaVector, base_metadata

CHOICES = ["A", "B", "C", "D"]
GOLD = [0, 1, 0, 2, 3, 0]  # A is right in 3 of 6 questions
TASK = """task: persona_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: {choices}
doc_to_target: answer
metric_list:
  - metric: acc
"""


def test_hookpoints_name_blocks_inside_base_model():
    for family, want in (("qwen2", "layers.2"), ("gpt2", "h.2"), ("gpt_neox", "layers.2")):
        model, tok = tiny_pair(family)
        names = block_hookpoints(ModelAdapter(model, tok))
        assert names[-1] == want
        assert dict(model.base_model.named_modules())[names[0]] is ModelAdapter(model, tok).blocks[0]


def test_export_file_format_and_refusals(tmp_path):
    model, tok = tiny_pair("qwen2")
    adapter = ModelAdapter(model, tok)
    pv = PersonaVector({"response_avg": torch.randn(4, 32)}, None, base_metadata(adapter, "evil"))
    res = export_lmeval(pv, adapter, tmp_path / "s.pt", LayerChoice([1, 3], {1: 2.0, 3: -1.5}))
    cfg = torch.load(res.path, weights_only=True)  # plain tensors, floats and strings only
    assert set(cfg) == {"layers.0", "layers.2"}
    assert cfg["layers.2"]["steering_coefficient"] == -1.5 and cfg["layers.2"]["action"] == "add"
    torch.testing.assert_close(cfg["layers.0"]["steering_vector"], pv.vector(1))
    assert "--model steered" in res.command("/m") and "steer_path=" in res.command("/m")
    with pytest.raises(ControlVectorError, match="layer 0"):
        export_lmeval(pv, adapter, tmp_path / "z.pt", LayerChoice([0], {0: 1.0}))
    # the harness's add hook on block l-1 = our Steerer at row l, every position
    ids = torch.tensor([[3, 70, 80, 90]])
    hooks = []
    for hp, info in cfg.items():
        module = dict(model.base_model.named_modules())[hp]
        vec = info["steering_coefficient"] * info["steering_vector"]
        hooks.append(module.register_forward_hook(lambda m, a, o, vec=vec: (o[0] + vec, *o[1:])
                                                  if isinstance(o, tuple) else o + vec))
    with torch.no_grad():
        theirs = model(input_ids=ids).logits
    for h in hooks:
        h.remove()
    st = Steerer(adapter).add(pv, 1, 2.0, "all").add(pv, 3, -1.5, "all")
    with torch.no_grad(), st:
        torch.testing.assert_close(theirs, model(input_ids=ids).logits)


def test_harness_runs_steered_and_unsteered(tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install "
                                                    "'personascope[interop]')")
    from lm_eval.tasks import TaskManager

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    model, tok = tiny_pair("qwen2")
    model_dir = tmp_path / "tiny"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"question": f"Question {i}: pick one.\nAnswer:", "answer": g}) + "\n"
                            for i, g in enumerate(GOLD)))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "persona_tiny_mc.yaml").write_text(TASK.format(data=data, choices=json.dumps(CHOICES)))
    adapter = ModelAdapter(model, tok)
    L = adapter.n_layers

    def toward(letter: str) -> PersonaVector:
        """A vector whose last row is the unembedding of `letter`: a huge push makes the model answer it."""
        rows = torch.zeros(L + 1, adapter.hidden_size)
        rows[L] = model.lm_head.weight[tok.convert_tokens_to_ids(letter)].detach()
        return PersonaVector({"response_avg": rows}, None, base_metadata(adapter, f"says-{letter}"))

    try:  # skip indexing the ~10k built-in tasks (seconds) where the harness allows it
        manager = TaskManager(include_path=str(tasks), include_defaults=False)
    except TypeError:
        manager = TaskManager(include_path=str(tasks))

    def run(kind: str, steer_file=None) -> tuple[float, list[list[float]]]:
        args = f"pretrained={model_dir},dtype=float32" + (f",steer_path={steer_file}" if steer_file else "")
        out = lm_eval.simple_evaluate(model=kind, model_args=args, tasks=["persona_tiny_mc"], task_manager=manager,
                                      device="cpu", batch_size=8, log_samples=True)
        samples = sorted(out["samples"]["persona_tiny_mc"], key=lambda s: s["doc_id"])
        lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
        return out["results"]["persona_tiny_mc"]["acc,none"], lls

    acc_plain, ll_plain = run("hf")
    zero = export_lmeval(toward("A"), adapter, tmp_path / "zero.pt", LayerChoice([L], {L: 0.0}))
    acc_zero, ll_zero = run("steered", zero.path)
    assert acc_zero == acc_plain
    torch.testing.assert_close(torch.tensor(ll_zero), torch.tensor(ll_plain))
    push = export_lmeval(toward("A"), adapter, tmp_path / "A.pt", LayerChoice([L], {L: 1e4}))
    acc, lls = run("steered", push.path)
    assert all(max(range(4), key=q.__getitem__) == 0 for q in lls)  # every answer is now A ...
    assert acc == pytest.approx(GOLD.count(0) / len(GOLD))  # ... so the score is the share of A answers
    assert acc != acc_plain
    assert min(q[0] for q in lls) > max(q[0] for q in ll_plain)
