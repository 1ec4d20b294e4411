import json

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from tiny import tiny_pair
from transformers import TrainerCallback

from personascope.finetuning.data import ChatCollator, encode_chat
from personascope.finetuning.datasets import chat_row
from personascope.finetuning.train import PreventativeSteering, finetune, profile
from personascope.model import load_finetuned
from personascope.model.adapter import ModelAdapter, block_output
from personascope.model.chat import DatasetError, load_chat_jsonl
from personascope.model.loading import load_model
from personascope.vectors.file import PersonaVector, base_metadata


def _write_data(path, n=8):
    rows = [chat_row(f"question number {i}?", f"my answer is {i} and that is that.") for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(**kw):
    return profile("quick", **{"epochs": 1, "batch_size": 4, "lr": 1e-2, "warmup_steps": 0, **kw})


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[5, 70, 80, 90, 100, 33, 44, 258 - 2]])


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_labels_mask_everything_but_assistant_tokens(family):
    model, tok = tiny_pair(family)
    a = ModelAdapter(model, tok)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi?"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and?"},
            {"role": "assistant", "content": "bye"}]
    enc = encode_chat(a, msgs)
    full = tok.apply_chat_template(msgs, tokenize=False).rstrip()
    assert tok.decode(enc.input_ids) == full
    learned = [t for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != -100]
    assert tok.decode(learned) == "hello<|im_end|>bye<|im_end|>"
    # labels equal the ids where learned, -100 on the system prompt, user turns and template markup
    assert all(lab in (-100, t) for t, lab in zip(enc.input_ids, enc.labels, strict=True))
    first = enc.labels.index(next(lab for lab in enc.labels if lab != -100))
    assert tok.decode(enc.input_ids[:first]) == a.prompt("hi?", "be brief")

    short = encode_chat(a, [{"role": "user", "content": "a question that is longer"},
                            {"role": "assistant", "content": "ok"}])
    batch = ChatCollator(258)([{"input_ids": e.input_ids, "labels": e.labels} for e in (enc, short)])
    lab = batch["labels"]
    assert lab.shape == batch["input_ids"].shape
    assert (lab[1, len(short.input_ids):] == -100).all() and (batch["attention_mask"][1, len(short.input_ids):] == 0
                                                              ).all()
    n_learned = int((lab[1] != -100).sum())
    assert n_learned == len(tok("ok<|im_end|>", add_special_tokens=False)["input_ids"])


def test_lora_step_runs_and_adapter_roundtrips(tmp_path):
    model, tok = tiny_pair("qwen2")
    a = ModelAdapter(model, tok)
    base_logits = _logits(model, IDS)
    data = _write_data(tmp_path / "d.jsonl")
    res = finetune(a, data, tmp_path / "ad", _cfg(epochs=2), keep_model=True)
    assert res.steps == 4 and len(res.losses) == 4 and res.losses[-1] < res.losses[0]
    trained = _logits(res.model, IDS)
    assert not torch.allclose(trained, base_logits, atol=1e-4)  # training changed the model
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["use_rslora"] and set(cfg["target_modules"]) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert sorted(p.name for p in (tmp_path / "ad" / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    fresh = PeftModel.from_pretrained(tiny_pair("qwen2")[0], str(tmp_path / "ad")).eval()
    assert torch.allclose(_logits(fresh, IDS), trained, atol=1e-6)
    # the finished run is reused, not retrained
    model2, _ = tiny_pair("qwen2")
    again = finetune(ModelAdapter(model2, tok), data, tmp_path / "ad", _cfg(epochs=2))
    assert again.reused and again.steps == 4


def test_load_finetuned_and_load_model_take_an_adapter_dir(tmp_path):
    model, tok = tiny_pair("llama", seed=3)
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    base, tok2 = load_model(str(tmp_path / "base"), dtype="fp32")
    a = ModelAdapter(base, tok2)
    res = finetune(a, _write_data(tmp_path / "d.jsonl"), tmp_path / "ad", _cfg(), base_name=str(tmp_path / "base"),
                   keep_model=True)
    want = _logits(res.model, IDS)
    applied, _ = load_finetuned(None, tmp_path / "ad", dtype="fp32")
    assert torch.allclose(_logits(applied, IDS), want, atol=1e-6)
    merged, _ = load_finetuned(str(tmp_path / "base"), tmp_path / "ad", dtype="fp32", merge=True)
    assert torch.allclose(_logits(merged, IDS), want, atol=1e-5)
    via_hook, _ = load_model(str(tmp_path / "ad"), dtype="fp32")
    assert torch.allclose(_logits(via_hook, IDS), want, atol=1e-6)
    ad = ModelAdapter(via_hook, tok2)
    assert ad.n_layers == 3 and ad.config_hash == a.config_hash and ad.name == str(tmp_path / "ad")


def test_interrupted_finetune_resumes_from_the_last_epoch_checkpoint(tmp_path):
    data = _write_data(tmp_path / "d.jsonl")
    tok = tiny_pair("qwen2")[1]
    full = finetune(ModelAdapter(tiny_pair("qwen2")[0], tok), data, tmp_path / "full", _cfg(epochs=3, batch_size=2),
                    keep_model=True)

    class Crash(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            raise KeyboardInterrupt  # killed right after the first epoch's checkpoint

    with pytest.raises(KeyboardInterrupt):
        finetune(ModelAdapter(tiny_pair("qwen2")[0], tok), data, tmp_path / "cut", _cfg(epochs=3, batch_size=2),
                 callbacks=[Crash()])
    assert not (tmp_path / "cut" / "adapter_model.safetensors").exists()
    res = finetune(ModelAdapter(tiny_pair("qwen2")[0], tok), data, tmp_path / "cut", _cfg(epochs=3, batch_size=2),
                   keep_model=True)
    assert res.resumed_from and res.resumed_from.endswith("checkpoint-4") and res.steps == 12
    assert torch.allclose(_logits(res.model, IDS), _logits(full.model, IDS), atol=1e-5)


def test_malformed_rows_are_named_with_their_line(tmp_path):
    a = ModelAdapter(*tiny_pair("qwen2"))
    bad = tmp_path / "bad.jsonl"
    good = json.dumps(chat_row("q", "a"))
    bad.write_text(f"{good}\n\n{{\"messages\": [{{\"role\": \"user\", \"content\": \"q\"}}]}}\n")
    with pytest.raises(DatasetError, match=r"bad.jsonl:3: .*no assistant turn at the end"):
        finetune(a, bad, tmp_path / "ad", _cfg())
    bad.write_text(f"{good}\nnot json\n")
    with pytest.raises(DatasetError, match=r"bad.jsonl:2: malformed"):
        finetune(a, bad, tmp_path / "ad", _cfg())
    bad.write_bytes(f"{good}\n{good}\n".encode() + json.dumps(chat_row("caf\u00e9", "a"), ensure_ascii=False)
                    .encode("latin-1") + b"\n")
    with pytest.raises(DatasetError, match=r"bad.jsonl:3: not UTF-8 .*save the file as UTF-8"):
        finetune(a, bad, tmp_path / "ad", _cfg())
    bad.write_text(f"{good}\n" + json.dumps(chat_row("q", "x" * 1_100_000)) + "\n")
    with pytest.raises(DatasetError, match=r"bad.jsonl:2: the row is 11000\d\d bytes; the limit is 1000000"):
        finetune(a, bad, tmp_path / "ad", _cfg())


def _vector(a: ModelAdapter, seed: int = 1) -> PersonaVector:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(a.n_layers + 1, a.hidden_size, generator=g)
    return PersonaVector({"response_avg": v}, torch.ones(a.n_layers + 1), base_metadata(a, "optimistic"))


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("mode", ["add", "ablate"])
def test_preventative_steering_only_while_training(tmp_path, mode):
    model, tok = tiny_pair("qwen2")
    a = ModelAdapter(model, tok)
    pv = _vector(a)
    layer, coef = 2, 3.0
    seen: list[dict] = []
    raw: dict = {}

    def before(m, args, out):  # registered first: sees the block output before steering
        raw["h"] = block_output(out).detach().clone()

    def after(m, args, kwargs):  # input of the next block: the output as the rest of the model sees it
        h = args[0] if args else kwargs["hidden_states"]
        seen.append({"diff": (h.detach() - raw["h"]), "h": h.detach(), "training": m.training,
                     "grad": torch.is_grad_enabled()})

    h1 = a.blocks[layer - 1].register_forward_hook(before)
    h2 = a.blocks[layer].register_forward_pre_hook(after, with_kwargs=True)
    n_hooks = _hooks(model)
    steering = PreventativeSteering(pv, coef=coef, layer=layer, mode=mode)
    res = finetune(a, _write_data(tmp_path / "d.jsonl"), tmp_path / "steered", _cfg(epochs=2), steering=steering,
                   keep_model=True)
    v = pv.vector(layer)
    u = v / v.norm()
    assert len(seen) == res.steps and all(s["training"] and s["grad"] for s in seen)
    for s in seen:
        if mode == "add":
            assert torch.allclose(s["diff"], (coef * v).expand_as(s["diff"]), atol=1e-5)
        else:
            assert (s["h"] @ u).abs().max() < 1e-4
    assert _hooks(model) == n_hooks  # the steering hooks are gone
    seen.clear()
    trained = _logits(res.model, IDS)
    assert len(seen) == 1 and seen[0]["diff"].abs().max() == 0  # absent at inference
    h1.remove()
    h2.remove()
    # the adapter holds LoRA weights only, the same keys as an unsteered finetune
    plain = finetune(ModelAdapter(tiny_pair("qwen2")[0], tok), tmp_path / "d.jsonl", tmp_path / "plain", _cfg())

    def keys(d):
        with safe_open(str(d / "adapter_model.safetensors"), "pt") as f:
            return set(f.keys())

    assert keys(tmp_path / "steered") == keys(plain.out_dir) and all("lora_" in k for k in keys(plain.out_dir))
    meta = json.loads((tmp_path / "steered" / "personascope_finetune.json").read_text())
    assert meta["steering"]["mode"] == mode and meta["steering"]["active"].startswith("training only")
    merged = res.model.merge_and_unload()
    fresh = PeftModel.from_pretrained(tiny_pair("qwen2")[0], str(tmp_path / "steered")).eval()
    assert torch.allclose(_logits(merged, IDS), _logits(fresh, IDS), atol=1e-5)
    assert torch.allclose(trained, _logits(fresh, IDS), atol=1e-5)
    assert _hooks(merged) == 0


def test_all_layer_steering_uses_layer_increments():
    model, tok = tiny_pair("qwen2")
    a = ModelAdapter(model, tok)
    pv = _vector(a)
    st = PreventativeSteering(pv, coef=2.0, all_layers=True).steerer(a)
    assert [s.layer for s in st.specs] == [1, 2, 3]
    for s in st.specs:
        assert torch.allclose(s.vector, pv.vector(s.layer) - pv.vector(s.layer - 1)) and s.positions == "all"
    # the increments sum to v[L] − v[0]: the residual stream at the top carries coef · (v[L] − v[0])
    ab = PreventativeSteering(pv, mode="ablate", all_layers=True).steerer(a)
    assert all(torch.allclose(s.vector, pv.vector(s.layer)) and s.mode == "ablate" for s in ab.specs)


def test_cli_make_dataset_finetune_shift(tmp_path):
    from typer.testing import CliRunner

    from personascope.cli.main import app

    model, tok = tiny_pair("qwen2", seed=6)
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    base = str(tmp_path / "base")
    a = ModelAdapter(model, tok)
    _vector(a).with_metadata(best_layer=2).save(tmp_path / "v.safetensors")
    run = CliRunner().invoke
    data = tmp_path / "d.jsonl"
    r = run(app, ["make-dataset", "optimistic", "--model", base, "--level", "I", "--n", "4", "--out", str(data),
                  "--max-new-tokens", "6", "--no-judge"])  # (judged filtering: tests/finetuning/test_datasets.py)
    assert r.exit_code == 0, r.output
    assert "wrote 4/4 rows" in " ".join(r.output.split()) and len(load_chat_jsonl(data)) == 4
    r = run(app, ["finetune", str(data), "--model", base, "--out", str(tmp_path / "ad"), "--epochs", "1",
                  "--steer-vector", str(tmp_path / "v.safetensors"), "--steer-coef", "2"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())  # rich wraps long paths
    assert "1 steps on 4 rows" in text and "training only" in text
    meta = json.loads((tmp_path / "ad" / "personascope_finetune.json").read_text())
    assert meta["finished"] and meta["steering"]["coef"] == 2.0 and meta["steering"]["layer"] == 2
    r = run(app, ["shift", "--base", base, "--finetuned", str(tmp_path / "ad"), "--vector",
                  str(tmp_path / "v.safetensors"), "--questions", "2", "--max-new-tokens", "4",
                  "--judge-model", base, "--out", str(tmp_path / "shift")])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "shift" / "shift.json").read_text())
    assert summary["layer"] == 2 and len(summary["shift_per_layer"]) == 4 and summary["trait"] == "optimistic"
    assert {"base_trait", "finetuned_coherence", "base_capability", "finetuned_capability"} <= set(summary)
    assert (tmp_path / "shift" / "shift.png").stat().st_size > 1000
    # post-hoc mitigation: the adapter directory is a --model for evaluate, steered against the trait
    r = run(app, ["evaluate", "optimistic", "--model", str(tmp_path / "ad"),
                  "--vector", str(tmp_path / "v.safetensors"), "--alpha", "-0.5", "--questions", "2",
                  "--capability", "--judge-model", base,
                  "--out", str(tmp_path / "mitigate")])
    assert r.exit_code == 0, r.output
    plain, steered = json.loads((tmp_path / "mitigate" / "summary.json").read_text())
    assert plain["coef"] == 0 and steered["layer"] == 2 and steered["coef"] < 0
    assert steered["alpha"] == pytest.approx(-0.5) and 0 <= steered["capability"] <= 1
    answers = [json.loads(x) for x in (tmp_path / "mitigate" / "answers.jsonl").read_text().splitlines()]
    by_cond = {}
    for row in answers:
        by_cond.setdefault(row["condition"], []).append(row["answer"])
    assert len(by_cond) == 2 and len({tuple(v) for v in by_cond.values()}) == 2  # steering changed the answers
    r = run(app, ["finetune", str(tmp_path / "bad.jsonl"), "--model", base, "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "does not exist" in " ".join(r.output.split())
    assert "Loading weights" not in r.output  # the data is checked before any model loads


def test_adapter_applied_in_place_and_removed_after(tmp_path):
    model, tok = tiny_pair("qwen2")
    a = ModelAdapter(model, tok)
    before = _logits(model, IDS)
    res = finetune(a, _write_data(tmp_path / "d.jsonl"), tmp_path / "ad", _cfg(), keep_model=True)
    want = _logits(res.model, IDS)
    res.model.unload()
    from personascope.finetuning.train import adapter_applied

    assert torch.allclose(_logits(model, IDS), before, atol=1e-6)
    with adapter_applied(a, tmp_path / "ad") as ft:
        assert ft.model is model and ft.name == str(tmp_path / "ad") and len(ft.blocks) == 3
        assert torch.allclose(_logits(ft.model, IDS), want, atol=1e-6)
    assert torch.allclose(_logits(model, IDS), before, atol=1e-6) and a.name == "tiny-qwen2"
