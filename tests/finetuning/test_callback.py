import json

import pytest
import torch
from tiny import tiny_pair

from personascope.finetuning.callback import PersonaShiftCallback, watch_traits
from personascope.finetuning.datasets import chat_row
from personascope.finetuning.telemetry import ShiftInputError, ShiftRule, probe_last_token, read_trajectory
from personascope.finetuning.train import PreventativeSteering, finetune, profile
from personascope.model.activations import last_token_activations
from personascope.model.adapter import ModelAdapter
from personascope.traits.trait import load_trait
from personascope.vectors.file import PersonaVector, base_metadata


def _data(path, n=8):
    rows = [chat_row(f"question number {i}?", f"my answer is {i} and that is that.") for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(**kw):
    return profile("quick", **{"epochs": 2, "batch_size": 2, "lr": 1e-2, "warmup_steps": 0, **kw})


def _vector(a: ModelAdapter, trait: str = "optimistic", seed: int = 1, layer: int = 2) -> PersonaVector:
    v = torch.randn(a.n_layers + 1, a.hidden_size, generator=torch.Generator().manual_seed(seed))
    return PersonaVector({"response_avg": v}, torch.ones(a.n_layers + 1), base_metadata(a, trait)
                         ).with_metadata(best_layer=layer)


def _watch(a, **kw):
    vecs = [_vector(a, "optimistic"), _vector(a, "humorous", seed=2, layer=1)]
    return watch_traits(a, vecs, n_questions=3, **kw)


def test_losses_are_bit_identical_with_and_without_the_callback(tmp_path):
    data = _data(tmp_path / "d.jsonl")
    tok = tiny_pair("qwen2")[1]
    plain = finetune(ModelAdapter(tiny_pair("qwen2")[0], tok), data, tmp_path / "plain", _cfg(dropout=0.1))
    a = ModelAdapter(tiny_pair("qwen2")[0], tok)
    watch = _watch(a, every_n_steps=1)
    watched = finetune(a, data, tmp_path / "watched", _cfg(dropout=0.1), watch=watch)
    assert plain.steps == watched.steps == 8 and len(watched.losses) == 8
    assert watched.losses == plain.losses  # exact: dropout RNG, data order and optimizer untouched
    rows, events = read_trajectory(tmp_path / "watched")
    assert [r["step"] for r in rows] == list(range(9)) and not events
    assert rows[0]["values"]["optimistic"]["shift"] == 0 and rows[-1]["values"]["humorous"]["shift"] != 0
    assert not a.model.training and (tmp_path / "watched" / "persona_shift.png").stat().st_size > 1000
    meta = json.loads((tmp_path / "watched" / "personascope_finetune.json").read_text())
    assert meta["persona_shift"]["measurements"] == 9 and meta["watch"]["vectors"]["humorous"]["layer"] == 1


def test_probe_matches_the_shift_measurement_and_stops_early():
    a = ModelAdapter(*tiny_pair("llama", seed=2))
    prompts = [a.prompt(q) for q in load_trait("optimistic").eval_questions[:5]]
    ids = [a.encode_prompt(p) for p in prompts]
    full = last_token_activations(a, prompts)
    calls = []
    h = a.blocks[2].register_forward_hook(lambda m, i, o: calls.append(1))
    got = probe_last_token(a, ids, [2, 1], batch_size=2)
    h.remove()
    assert not calls  # block 2 (layer 3) never ran: the probe stops after the highest layer it reads
    assert torch.allclose(got[:, 0], full[:, 2], atol=1e-5) and torch.allclose(got[:, 1], full[:, 1], atol=1e-5)


def test_default_interval_is_a_tenth_of_training(tmp_path):
    a = ModelAdapter(*tiny_pair("qwen2"))
    watch = _watch(a)
    finetune(a, _data(tmp_path / "d.jsonl", 16), tmp_path / "ad", _cfg(epochs=3), watch=watch)  # 24 steps
    steps = [r["step"] for r in read_trajectory(tmp_path / "ad")[0]]
    assert steps == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24]


def test_tensorboard_events_hold_the_persona_metrics(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import Trainer, TrainingArguments

    from personascope.finetuning.data import ChatCollator, ChatDataset, encode_dataset
    from personascope.model.chat import load_chat_jsonl

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    model, tok = tiny_pair("qwen2")
    a = ModelAdapter(model, tok)
    items = encode_dataset(a, load_chat_jsonl(_data(tmp_path / "d.jsonl")), 256)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, max_steps=4,
                             learning_rate=1e-2, logging_steps=1, report_to=["tensorboard"], use_cpu=True,
                             save_strategy="no", remove_unused_columns=False,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=ChatDataset(items), data_collator=ChatCollator(258))
    watch = _watch(a, every_n_steps=2).attach(trainer)  # a user's own Trainer, full finetuning
    trainer.train()
    acc = EventAccumulator(str(tmp_path / "tb")).Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/persona/optimistic/shift", "train/persona/humorous/projection", "train/loss"} <= set(tags)
    shifts = acc.Scalars("train/persona/optimistic/shift")
    assert [e.step for e in shifts] == [0, 2, 4] and shifts[0].value == 0
    assert shifts[-1].value == pytest.approx(watch.history[-1]["values"]["optimistic"]["shift"], abs=1e-4)
    assert (tmp_path / "run" / "persona_shift.jsonl").exists()


def test_stop_above_stops_and_keeps_the_last_good_weights(tmp_path):
    data = _data(tmp_path / "d.jsonl")
    a = ModelAdapter(*tiny_pair("qwen2"))
    probe = _watch(a, every_n_steps=1)
    finetune(a, data, tmp_path / "free", _cfg(), watch=probe)
    shifts = [r["values"]["optimistic"]["shift"] for r in probe.history]
    # a threshold the free run crosses at some step s > 1 (it moves the model along v by chance)
    s = next(i for i in range(2, len(shifts)) if abs(shifts[i]) > abs(shifts[i - 1]))
    sign = 1 if shifts[s] > 0 else -1
    vec = _vector(a, "optimistic")
    if sign < 0:
        vec = PersonaVector({"response_avg": -vec.vectors["response_avg"]}, vec.resid_norm, vec.metadata)
    thr = (abs(shifts[s]) + abs(shifts[s - 1])) / 2 if abs(shifts[s - 1]) < abs(shifts[s]) else abs(shifts[s]) / 2
    b = ModelAdapter(*tiny_pair("qwen2"))
    watch = watch_traits(b, [vec], every_n_steps=1, n_questions=3, rules=[ShiftRule.stop("optimistic", thr)])
    res = finetune(b, data, tmp_path / "stopped", _cfg(), watch=watch, keep_model=True)
    rows, events = read_trajectory(tmp_path / "stopped")
    first_bad = next(r["step"] for r in rows if r["values"]["optimistic"]["shift"] > thr)
    assert res.steps == first_bad == events[0]["step"] and events[0]["event"] == "stop"
    assert events[0]["kept_step"] == first_bad - 1
    # the saved adapter is the last good one: its shift is the one measured at kept_step
    again = watch_traits(b, [vec], n_questions=3)
    again.base = watch.base
    now = again.measure(res.model)["optimistic"]["shift"]
    assert now == pytest.approx(rows[first_bad - 1]["values"]["optimistic"]["shift"], abs=1e-4) and now <= thr
    meta = json.loads((tmp_path / "stopped" / "personascope_finetune.json").read_text())
    assert meta["persona_shift"]["events"][0]["kept_step"] == first_bad - 1


def test_steer_above_switches_steering_on_and_records_it(tmp_path):
    data = _data(tmp_path / "d.jsonl")
    a = ModelAdapter(*tiny_pair("qwen2"))
    n_hooks = sum(len(m._forward_hooks) for m in a.model.modules())
    watch = _watch(a, every_n_steps=2, rules=[ShiftRule.steer("optimistic", -1e9, 3.0)])
    raw, diffs = {}, []

    def before(m, args, out):  # registered first: the block output before any steering
        raw["h"] = out[0].detach().clone() if isinstance(out, tuple) else out.detach().clone()

    def after(m, args):  # what block 2 receives: training forwards only (the probe stops after layer 2)
        diffs.append(args[0].detach() - raw["h"])

    h1, h2 = a.blocks[1].register_forward_hook(before), a.blocks[2].register_forward_pre_hook(after)
    finetune(a, data, tmp_path / "ad", _cfg(), watch=watch)
    h1.remove()
    h2.remove()
    v = watch.vectors["optimistic"].vector(2)
    assert len(diffs) == 8 and all(torch.allclose(d, (3.0 * v).expand_as(d), atol=1e-5) for d in diffs)
    rows, events = read_trajectory(tmp_path / "ad")
    assert events == [{"event": "steer", "step": 0, "vector": "optimistic", "shift": 0.0, "threshold": -1e9,
                       "layer": 2, "coef": 3.0}]
    meta = json.loads((tmp_path / "ad" / "personascope_finetune.json").read_text())
    assert meta["persona_shift"]["events"] == events and meta["watch"]["rules"][0]["action"] == "steer"
    assert sum(len(m._forward_hooks) for m in a.model.modules()) == n_hooks  # steering gone after training
    # the probe forwards (eval mode) ran without the steering: the step-0 probe equals a fresh measurement
    fresh = _watch(ModelAdapter(*tiny_pair("qwen2")))
    fresh.check(tiny_pair("qwen2")[0])
    assert rows[0]["values"]["optimistic"]["projection"] == pytest.approx(
        fresh.measure()["optimistic"]["projection"], abs=1e-5)


def test_preventative_steering_is_lifted_while_measuring(tmp_path):
    a = ModelAdapter(*tiny_pair("qwen2"))
    watch = _watch(a, every_n_steps=4)
    steering = PreventativeSteering(_vector(a, "optimistic"), coef=50.0, layer=2)
    finetune(a, _data(tmp_path / "d.jsonl"), tmp_path / "ad", _cfg(lr=1e-9), watch=watch, steering=steering)
    # with a negligible lr the model does not move: a +50·v hook left on during probing would show as a shift of 50‖v‖
    assert all(abs(r["values"]["optimistic"]["shift"]) < 1e-2 for r in watch.history)


@pytest.mark.parametrize("case", ["other_model", "too_long", "unwatched_rule"])
def test_bad_input_fails_before_anything_is_written(tmp_path, case):
    a = ModelAdapter(*tiny_pair("qwen2"))
    if case == "other_model":
        other = ModelAdapter(*tiny_pair("qwen2", hidden_size=16, intermediate_size=32))
        watch = watch_traits(a, [_vector(other)], n_questions=2)
        match = "watched vector 'optimistic': .*hidden size 16"
    elif case == "too_long":
        watch = PersonaShiftCallback([_vector(a)], ["word " * 300], tokenizer=a.tokenizer)
        match = "probe prompt 1 of 'optimistic' is \\d+ tokens; tiny-qwen2 takes at most 256"
    else:
        with pytest.raises(ShiftInputError, match="stop_above names 'evil', which is not watched"):
            PersonaShiftCallback([_vector(a)], ["hi"], rules=[ShiftRule.stop("evil", 1.0)])
        return
    with pytest.raises(ShiftInputError, match=match):
        finetune(a, _data(tmp_path / "d.jsonl"), tmp_path / "ad", _cfg(), watch=watch)
    assert not (tmp_path / "ad").exists()
