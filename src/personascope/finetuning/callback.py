"""PersonaShiftCallback: the finetuning shift along persona vectors, measured while a transformers Trainer runs.

Every `every_n_steps` optimiser steps (and at step 0, and at the last step) the callback runs the fixed
probe prompts through the model in eval mode without gradients and takes the mean projection of the
last prompt token's residual on each v̂[l]; the shift is that mean minus its step-0 value (the paper's
finetuning shift, measured during training). Train mode, the optimizer, the RNG and the data order are
left as they were, so the losses are those of a run without it. Values go to the Trainer's log stream
(`trainer.log`: TensorBoard, W&B, MLflow, console through `report_to`), to `persona_shift.jsonl` and to
`persona_shift.png` in `out_dir` (default: the Trainer's output_dir). Rules: `stop` ends training and
puts back the trainable weights of the last measurement below every stop threshold; `steer` adds
+coef·v[l] at all positions for the rest of training (taken off while measuring and after training).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import TrainerCallback

from personascope.model import HookedOperation, ModelAdapter
from personascope.steering import Steerer
from personascope.vectors import PersonaVector

from .telemetry import (
    PLOT_FILE,
    TRAJECTORY_FILE,
    ShiftInputError,
    ShiftRule,
    check_probes,
    plot_trajectory,
    probe_last_token,
    read_trajectory,
    unwrap,
)

log = logging.getLogger(__name__)

Probes = Sequence[str] | Mapping[str, Sequence[str]]


class PersonaShiftCallback(TrainerCallback):
    """Track the shift along persona vectors during training, log it where training is watched, act on rules."""

    def __init__(
        self,
        vectors: Mapping[str, PersonaVector] | Sequence[PersonaVector],
        probe_prompts: Probes,
        every_n_steps: int | None = None,
        rules: Sequence[ShiftRule] = (),
        tokenizer=None,
        layers: Mapping[str, int] | None = None,
        out_dir: str | Path | None = None,
        batch_size: int = 16,
        trainer=None,
    ) -> None:
        self.vectors = dict(vectors) if isinstance(vectors, Mapping) else {v.trait: v for v in vectors}
        if not isinstance(vectors, Mapping) and len(self.vectors) != len(vectors):
            raise ShiftInputError("two vectors share a trait name; pass them as a {name: vector} mapping")
        if not self.vectors:
            raise ShiftInputError("no persona vector to watch")
        if every_n_steps is not None and every_n_steps < 1:
            raise ShiftInputError(f"every_n_steps must be at least 1, got {every_n_steps}")
        if isinstance(probe_prompts, Mapping):
            missing = sorted(set(self.vectors) - set(probe_prompts))
            if missing:
                raise ShiftInputError(f"no probe prompts for {', '.join(missing)}")
            self.prompts = {n: list(probe_prompts[n]) for n in self.vectors}
        else:
            self.prompts = {n: list(probe_prompts) for n in self.vectors}
        for rule in rules:
            if rule.vector not in self.vectors:
                raise ShiftInputError(f"rule {rule.action}_above names {rule.vector!r}, which is not watched "
                                      f"(watched: {', '.join(self.vectors)})")
        self.rules = list(rules)
        self.layers = {n: v.default_layer((layers or {}).get(n)) for n, v in self.vectors.items()}
        self.every_n_steps = every_n_steps
        self.tokenizer = tokenizer
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.batch_size = batch_size
        self.trainer = trainer
        self.paused: list[HookedOperation] = []  # other training-time hooks (preventative steering) to lift
        self.history: list[dict] = []
        self.events: list[dict] = []
        self.base: dict[str, float] = {}
        self.seconds = 0.0  # time spent measuring
        self._fired: set[int] = set()
        self._steerers: list[Steerer] = []
        self._good: dict[str, torch.Tensor] | None = None
        self._good_step = 0
        self._pending: dict[str, float] = {}
        self._ids: dict[str, list[list[int]]] | None = None
        self._adapter: ModelAdapter | None = None

    # ------------------------------------------------------------------ set-up and checks

    def attach(self, trainer) -> PersonaShiftCallback:
        """Add this callback to `trainer` and log through `trainer.log` (so every `report_to` sees the values)."""
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    def check(self, model, tokenizer=None) -> None:
        """Vectors against the model, probes against its context: ShiftInputError (one line) if they do not fit."""
        tokenizer = tokenizer or self.tokenizer
        if tokenizer is None:
            raise ShiftInputError("PersonaShiftCallback needs the tokenizer (tokenizer=...) to encode its probes")
        self.tokenizer = tokenizer
        model = model.model if isinstance(model, ModelAdapter) else model
        adapter = ModelAdapter(unwrap(model), tokenizer)
        for name, v in self.vectors.items():
            try:
                v.check(adapter)
                adapter.check_layer(self.layers[name])
            except ValueError as e:
                raise ShiftInputError(f"watched vector {name!r}: {e}") from None
        ids = {n: [adapter.encode_prompt(p) for p in ps] for n, ps in self.prompts.items()}
        check_probes(adapter, ids)
        self._ids, self._adapter = ids, adapter

    def _interval(self, max_steps: int) -> int:
        return self.every_n_steps or max(1, round(max_steps / 10))

    # ------------------------------------------------------------------ measuring

    def measure(self, model=None) -> dict[str, dict]:
        """Projections now (eval mode, no grad, steering lifted, RNG and train mode restored): {name: values}."""
        if self._ids is None or self._adapter is None or (model is not None and unwrap(model) is not
                                                          self._adapter.model):
            self.check(model if model is not None else self._adapter.model)  # type: ignore[union-attr]
        assert self._ids is not None and self._adapter is not None
        adapter = self._adapter
        start = time.perf_counter()
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        was_training = adapter.model.training
        lifted = [op for op in [*self._steerers, *self.paused] if op.attached]
        for op in lifted:
            op.remove()
        try:
            adapter.model.eval()
            unique = sorted({tuple(x) for ids in self._ids.values() for x in ids})
            where = {p: i for i, p in enumerate(unique)}
            layers = sorted(set(self.layers.values()))
            acts = probe_last_token(adapter, [list(p) for p in unique], layers, self.batch_size)
            values = {}
            for name, ids in self._ids.items():
                la = self.layers[name]
                v = self.vectors[name].vector(la).float()
                proj = acts[[where[tuple(x)] for x in ids], layers.index(la)].double() @ (v / v.norm()).double()
                mean = float(proj.mean())
                values[name] = {"layer": la, "projection": mean, "shift": mean - self.base.get(name, mean)}
        finally:
            adapter.model.train(was_training)
            for op in lifted:
                op.attach()
            torch.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
        self.seconds += time.perf_counter() - start
        return values

    def _record(self, state, model, control=None) -> None:
        values = self.measure(model)
        if not self.base:
            self.base = {n: v["projection"] for n, v in values.items()}
        row = {"step": state.global_step, "epoch": state.epoch or 0.0, "seconds": round(self.seconds, 3),
               "values": values}
        self.history.append(row)
        self._write(row, state)
        metrics = {f"persona/{n}/{k}": v[k] for n, v in values.items() for k in ("shift", "projection")}
        if self.trainer is not None:
            should_log = self.trainer.control.should_log  # the handler's on_log clears it; the loss log still due
            self.trainer.log(dict(metrics))
            self.trainer.control.should_log = should_log
        else:  # not bound: the next on_log carries them to the integrations after this callback
            self._pending.update(metrics)
            state.log_history.append({**metrics, "step": state.global_step})
        if control is not None:
            self._apply_rules(row, state, model, control)

    def _write(self, row: dict, state) -> None:
        if self.out_dir is None or not state.is_world_process_zero:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with (self.out_dir / TRAJECTORY_FILE).open("a") as f:
            f.write(json.dumps(row) + "\n")

    # ------------------------------------------------------------------ rules

    def _apply_rules(self, row: dict, state, model, control) -> None:
        stop = None
        for i, rule in enumerate(self.rules):
            shift = row["values"][rule.vector]["shift"]
            if i in self._fired or shift <= rule.threshold:
                continue
            self._fired.add(i)
            event = {"event": rule.action, "step": row["step"], "vector": rule.vector, "shift": shift,
                     "threshold": rule.threshold, "layer": self.layers[rule.vector]}
            if rule.action == "steer":
                self._start_steering(rule.vector, rule.coef)
                event["coef"] = rule.coef
                log.warning(f"persona shift of {rule.vector!r} is {shift:+.3f} > {rule.threshold} at step "
                            f"{row['step']}: preventative steering on (coef {rule.coef}, layer {event['layer']})")
            else:
                stop = event
            self.events.append(event)
            if rule.action == "steer":
                self._write(event, state)
        if stop is not None:
            self._stop(stop, state, model, control)
        elif any(r.action == "stop" for r in self.rules):
            self._good = {k: p.detach().clone() for k, p in unwrap(model).named_parameters() if p.requires_grad}
            self._good_step = row["step"]

    def _start_steering(self, name: str, coef: float) -> None:
        assert self._adapter is not None
        st = Steerer(self._adapter).add(self.vectors[name], self.layers[name], coef, "all", "add")
        self._steerers.append(st.attach())

    def _stop(self, event: dict, state, model, control) -> None:
        control.should_training_stop = True
        if self._good is not None:
            with torch.no_grad():
                for k, p in unwrap(model).named_parameters():
                    if k in self._good:
                        p.copy_(self._good[k])
        event["kept_step"] = self._good_step
        self._write(event, state)
        log.warning(f"persona shift of {event['vector']!r} is {event['shift']:+.3f} > {event['threshold']} at step "
                    f"{event['step']}: training stopped; the weights of step {self._good_step} (the last "
                    "measurement below every stop threshold) are kept")

    # ------------------------------------------------------------------ Trainer events

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kw):
        """Check the inputs, then measure step 0 (or, when resuming, reload the trajectory so far)."""
        if self.out_dir is None:
            self.out_dir = Path(args.output_dir)
        self.check(model, self.tokenizer or processing_class)
        path = self.out_dir / TRAJECTORY_FILE
        if state.global_step > 0 and path.exists():
            rows, events = read_trajectory(path)
            rows = [r for r in rows if r["step"] <= state.global_step]
            events = [e for e in events if e["step"] <= state.global_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in [*rows, *events]))
            if rows and rows[0]["step"] == 0:
                self.history, self.base = rows, {n: v["projection"] for n, v in rows[0]["values"].items()}
                for ev in events:
                    for i, rule in enumerate(self.rules):
                        if (rule.action, rule.vector) == (ev["event"], ev["vector"]) and i not in self._fired:
                            self._fired.add(i)
                            self.events.append(ev)
                            if rule.action == "steer":
                                self._start_steering(rule.vector, rule.coef)
                return control
        path.unlink(missing_ok=True)
        if state.global_step > 0:
            log.warning("resumed without a step-0 persona measurement: shifts are relative to the resumed model")
        self._record(state, model, control)
        return control

    def on_step_end(self, args, state, control, model=None, **kw):
        """Measure every N optimiser steps and at the last one; apply the rules."""
        step = state.global_step
        if step % self._interval(state.max_steps) == 0 or step >= state.max_steps:
            self._record(state, model, control)
        return control

    def on_log(self, args, state, control, logs=None, **kw):
        """Without a bound trainer, add pending values to the next log (for integrations called after this one)."""
        if self._pending and logs is not None:
            logs.update(self._pending)
            self._pending = {}
        return control

    def on_train_end(self, args, state, control, **kw):
        """Take the rule's steering off and draw the trajectory."""
        self.close()
        if self.out_dir is not None and state.is_world_process_zero and self.history:
            plot_trajectory(self.history, self.events, self.out_dir / PLOT_FILE,
                            f"persona shift during training ({args.run_name or self.out_dir.name})")
        return control

    def close(self) -> None:
        """Remove any steering hooks this callback added (also after an interrupted run)."""
        for st in self._steerers:
            st.remove()
        self._steerers = []

    def summary(self) -> dict:
        """What the run's metadata records: vectors, layers, interval, rules, events, measuring time."""
        return {"vectors": {n: {"path": v.path, "trait": v.trait, "layer": self.layers[n]}
                            for n, v in self.vectors.items()},
                "every_n_steps": self.every_n_steps or "10% of training",
                "rules": [asdict(r) for r in self.rules], "events": self.events, "measure_seconds": self.seconds,
                "measurements": len(self.history),
                "final": self.history[-1]["values"] if self.history else None}


def watch_traits(adapter: ModelAdapter, vectors: Mapping[str, PersonaVector] | Sequence[PersonaVector],
                 every_n_steps: int | None = None, rules: Sequence[ShiftRule] = (), n_questions: int | None = None,
                 **kw) -> PersonaShiftCallback:
    """A callback probing each vector on its trait's evaluation questions (the prompts of `personascope shift`)."""
    from personascope.traits import load_trait

    from .shift import eval_prompts

    vecs = dict(vectors) if isinstance(vectors, Mapping) else {v.trait: v for v in vectors}
    probes = {n: eval_prompts(adapter, load_trait(v.trait), n_questions) for n, v in vecs.items()}
    return PersonaShiftCallback(vecs, probes, every_n_steps, rules, tokenizer=adapter.tokenizer, **kw)
