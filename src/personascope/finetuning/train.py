"""LoRA finetuning on chat JSONL (peft + the transformers Trainer), with optional preventative steering.

- Loss only on assistant tokens: every other position (prompt, system, padding) has label -100.
- Profiles: `paper` (r 32, alpha 64, rsLoRA, q/k/v/o/gate/up/down, lr 1e-5, 1 epoch, effective
  batch 16) and `quick` (a CPU-sized run of a few dozen steps).
- A checkpoint per epoch under `OUT/checkpoints/`; a rerun resumes from the last one. The adapter
  is saved in PEFT's own format in `OUT/` (plus the tokenizer and `personascope_finetune.json`),
  so `PeftModel.from_pretrained(base, OUT)` loads it directly.
- Preventative steering: a Steerer adds `coef · v[l]` at all positions (or
  ablates v̂) around the training loop only. It is a forward hook, never a weight, so it is in no
  checkpoint or adapter and is gone at inference.

`load_finetuned(base, adapter_dir)` gives (model, tokenizer) with the adapter applied (or merged),
so every command can take an adapter directory as `--model`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from personascope.model import (
    META_FILE,
    ModelAdapter,
    load_chat_jsonl,
    pad_id,
)
from personascope.steering import Steerer
from personascope.util import write_json
from personascope.vectors import PersonaVector

from .callback import PersonaShiftCallback
from .data import ChatCollator, ChatDataset, encode_dataset

log = logging.getLogger(__name__)

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class FinetuneConfig:
    """LoRA and optimiser settings; `PROFILES` holds the paper's and a quick CPU one."""

    r: int = 32
    alpha: int = 64
    rslora: bool = True
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ALL_PROJECTIONS
    lr: float = 1e-5
    epochs: int = 1
    batch_size: int = 2
    grad_accum: int = 8  # effective batch = batch_size × grad_accum
    max_steps: int | None = None  # optimiser steps; overrides epochs when set
    warmup_steps: int = 5
    weight_decay: float = 0.01
    scheduler: str = "linear"
    max_len: int = 1024
    seed: int = 0


PROFILES: dict[str, FinetuneConfig] = {
    "paper": FinetuneConfig(),
    "quick": FinetuneConfig(r=8, alpha=16, lr=2e-4, epochs=3, batch_size=4, grad_accum=1, warmup_steps=2,
                            max_len=384),
}


def profile(name: str, **overrides) -> FinetuneConfig:
    """A named profile with some fields overridden (None values are ignored)."""
    if name not in PROFILES:
        raise ValueError(f"unknown finetuning profile {name!r}; choose from {', '.join(PROFILES)}")
    cfg = replace(PROFILES[name], **{k: v for k, v in overrides.items() if v is not None})
    check_config(cfg)
    return cfg


def check_config(cfg: FinetuneConfig) -> None:
    """Raise ValueError naming the first setting that would train nothing or crash mid-run (NaN included)."""
    whole = {"r": cfg.r, "alpha": cfg.alpha, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
             "grad_accum": cfg.grad_accum, "max_len": cfg.max_len}
    for name, v in whole.items():
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a whole number ≥ 1, got {v!r}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ValueError(f"max_steps must be ≥ 1, got {cfg.max_steps}")
    if not (math.isfinite(cfg.lr) and 0 < cfg.lr <= 1):
        raise ValueError(f"lr must be a number in (0, 1], got {cfg.lr!r}")
    if not 0 <= cfg.seed < 2**32:
        raise ValueError(f"seed must be in 0..{2**32 - 1}, got {cfg.seed}")


# ------------------------------------------------------------------------- preventative steering


@dataclass
class PreventativeSteering:
    """What is added (or ablated) during training only: one layer, or every layer incrementally."""

    vector: PersonaVector
    coef: float = 1.0
    layer: int | None = None  # None: the vector's default layer
    mode: str = "add"  # "add" or "ablate" (the CAFT baseline)
    all_layers: bool = False  # v[l] − v[l−1] at every l ≥ 1 (ablate: v̂[l] at every l ≥ 1)

    def steerer(self, adapter: ModelAdapter) -> Steerer:
        """A Steerer (not attached) that applies this at all positions."""
        self.vector.check(adapter)
        st = Steerer(adapter)
        if not self.all_layers:
            return st.add(self.vector, self.vector.default_layer(self.layer), self.coef, "all", self.mode)
        for la in range(1, adapter.n_layers + 1):
            v = self.vector.vector(la) if self.mode == "ablate" else self.vector.vector(la) - self.vector.vector(la - 1)
            st.add(v, la, self.coef, "all", self.mode)
        return st

    def describe(self) -> dict:
        return {"vector": self.vector.path, "trait": self.vector.trait, "coef": self.coef,
                "layer": "all" if self.all_layers else self.vector.default_layer(self.layer), "mode": self.mode,
                "active": "training only (forward hooks; not in the adapter)"}


# ------------------------------------------------------------------------- data


# ------------------------------------------------------------------------- training


@dataclass
class FinetuneResult:
    """Where the adapter is and how training went (`model` is the PeftModel when kept)."""

    out_dir: Path
    steps: int
    losses: list[float]
    seconds: float
    rows: int
    tokens: int
    resumed_from: str | None = None
    reused: bool = False
    model: object | None = field(default=None, repr=False)
    persona_shift: dict | None = None  # PersonaShiftCallback.summary() when watched


def stored_base(base_name: str) -> str:
    """The base model as an adapter records it: a built-in's loadable folder, a local folder's absolute path
    (so the adapter loads from any working directory), else the hub name as given."""
    from personascope.model import BUILTIN_MODELS, resolve_model_path

    if base_name in BUILTIN_MODELS:
        return base_name
    path = Path(resolve_model_path(base_name))
    return str(path.resolve()) if path.exists() else base_name


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _progress_callback():
    from transformers import TrainerCallback

    from personascope.util import progress_bar

    class RichProgress(TrainerCallback):
        """A rich progress bar with the running loss instead of tqdm."""

        bar = None

        def on_train_begin(self, args, state, control, **kw):
            self.bar = progress_bar()
            self.bar.start()
            self.task = self.bar.add_task("finetune", total=state.max_steps, completed=state.global_step, rate="")

        def on_step_end(self, args, state, control, **kw):
            self.bar.update(self.task, completed=state.global_step)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.bar.update(self.task, rate=f"loss {logs['loss']:.3f} · epoch {state.epoch:.2f}")

        def on_train_end(self, args, state, control, **kw):
            self.close()

        def close(self) -> None:
            """Stop the bar (also when training was interrupted)."""
            if self.bar is not None:
                self.bar.stop()
                self.bar = None

    return RichProgress()


def finetune(
    adapter: ModelAdapter,
    data: str | Path,
    out_dir: str | Path,
    cfg: FinetuneConfig | None = None,
    steering: PreventativeSteering | None = None,
    base_name: str | None = None,
    force: bool = False,
    keep_model: bool = False,
    profile_name: str = "",
    callbacks: list | None = None,
    watch: PersonaShiftCallback | None = None,
) -> FinetuneResult:
    """Train a LoRA adapter on a chat JSONL file and save it to `out_dir` (resumable).

    The caller's model gets the LoRA layers only while training: they are unloaded afterwards
    unless `keep_model`, in which case `result.model` is the trained PeftModel. A finished
    `out_dir` with the same data, config and steering is reused instead of retrained; an
    interrupted one resumes from its last epoch checkpoint. `callbacks` are extra TrainerCallbacks;
    `watch` tracks persona shifts (checked against the model before anything is written) and acts on its rules.
    """
    import shutil

    from peft import LoraConfig, get_peft_model
    from transformers import PrinterCallback, Trainer, TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    from personascope.model import resolve_model_path

    cfg = cfg or PROFILES["quick"]
    data, out_dir = Path(data), Path(out_dir)
    rows = load_chat_jsonl(data)
    base_name = base_name or adapter.name
    check_config(cfg)
    fingerprint = {"data_sha256": _sha256(data), "config": asdict(cfg), "base_model": stored_base(base_name),
                   "steering": steering.describe() if steering else None}
    if watch is not None:
        watch.check(adapter)  # a vector of another model or a probe set too long fails before anything is written
        fingerprint["watch"] = {k: v for k, v in watch.summary().items() if k in ("vectors", "every_n_steps", "rules")}
    meta_path = out_dir / META_FILE
    if meta_path.exists() and not force:
        meta = json.loads(meta_path.read_text())
        if meta.get("finished") and {k: meta.get(k) for k in fingerprint} == json.loads(json.dumps(fingerprint)):
            log.info(f"{out_dir} already holds this finetune; reusing it (--force retrains)")
            return FinetuneResult(out_dir, meta["steps"], meta["losses"], meta["seconds"], meta["rows"],
                                  meta["tokens"], reused=True, persona_shift=meta.get("persona_shift"))
        if meta.get("finished"):
            raise ValueError(f"{out_dir} holds a finished finetune with other data, settings or steering; "
                             "use --force to overwrite it or choose another --out")
    if force and out_dir.exists():
        shutil.rmtree(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    if ckpt_dir.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if {k: meta.get(k) for k in fingerprint} != json.loads(json.dumps(fingerprint)):
            raise ValueError(f"{out_dir} has checkpoints of a different run; use --force to start over")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(meta_path, {**fingerprint, "finished": False, "dataset": str(data), "profile": profile_name})

    items = encode_dataset(adapter, rows, cfg.max_len)
    n_tokens = sum(len(x.input_ids) for x in items)
    steerer = steering.steerer(adapter) if steering else None  # built on the plain model: same blocks after peft
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, use_rslora=cfg.rslora, lora_dropout=cfg.dropout,
                      target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")
    model = adapter.model
    use_cache = getattr(model.config, "use_cache", None)  # the Trainer turns it off; restored afterwards
    peft_model = get_peft_model(model, lora)
    args = TrainingArguments(
        output_dir=str(ckpt_dir), per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1, learning_rate=cfg.lr, lr_scheduler_type=cfg.scheduler,
        warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, logging_steps=1, save_strategy="epoch",
        report_to="none", disable_tqdm=True, use_cpu=adapter.device.type == "cpu", seed=cfg.seed,
        data_seed=cfg.seed, remove_unused_columns=False, dataloader_num_workers=0, optim="adamw_torch",
        log_level="warning",
    )
    progress = _progress_callback()
    trainer = Trainer(model=peft_model, args=args, train_dataset=ChatDataset(items),
                      data_collator=ChatCollator(pad_id(adapter.tokenizer)), callbacks=[progress, *(callbacks or [])])
    trainer.remove_callback(PrinterCallback)  # the rich bar shows the loss; no raw dicts on stdout
    if watch is not None:
        watch.out_dir = watch.out_dir or out_dir
        watch.paused = [steerer] if steerer is not None else []
        watch.attach(trainer)
    last = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.exists() else None
    if last:
        log.info(f"resuming from {last}")
    start = time.perf_counter()
    try:
        if steerer is not None:
            with steerer:
                trainer.train(resume_from_checkpoint=last)
        else:
            trainer.train(resume_from_checkpoint=last)
        seconds = time.perf_counter() - start
        losses = [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]
        # PEFT's own field gets a loadable absolute path (the dequantised built-in); our record the short name
        base_path = Path(resolve_model_path(base_name))
        peft_model.peft_config["default"].base_model_name_or_path = (str(base_path.resolve()) if base_path.exists()
                                                                      else base_name)
        peft_model.save_pretrained(str(out_dir), save_embedding_layers=False)
        adapter.tokenizer.save_pretrained(str(out_dir))
        result = FinetuneResult(out_dir, trainer.state.global_step, losses, seconds, len(items), n_tokens, last)
        shift = watch.summary() if watch is not None else None
        result.persona_shift = shift
        write_json(meta_path, {**fingerprint, "finished": True, "dataset": str(data), "profile": profile_name,
                               "steps": result.steps, "losses": losses, "seconds": seconds, "rows": len(items),
                               "tokens": n_tokens, "resumed_from": last, "persona_shift": shift,
                               "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
        _plot_losses(losses, out_dir / "loss.png", f"finetune {data.name} ({base_name})")
    finally:
        progress.close()
        if watch is not None:
            watch.close()
        if use_cache is not None:
            model.config.use_cache = use_cache
        peft_model.eval()
        if not keep_model:
            peft_model.unload()  # the caller's model without LoRA layers again
            model.eval()
    if keep_model:
        result.model = peft_model
    return result


def _plot_losses(losses: list[float], path: Path, title: str) -> None:
    if not losses:
        return
    import matplotlib.pyplot as plt

    from personascope.util import save_figure

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(range(1, len(losses) + 1), losses, marker="o", ms=2)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)


@contextmanager
def adapter_applied(adapter: ModelAdapter, adapter_dir: str | Path) -> Iterator[ModelAdapter]:
    """The same in-memory model with a saved LoRA adapter applied inside the context and removed after.

    No second copy of the base weights is made, so one loaded base model can evaluate many
    finetunes in turn (activations, generation, steering and capability all see the adapter).
    """
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(adapter.model, str(adapter_dir))
    peft_model.eval()
    name = adapter.model.config.name_or_path
    adapter.model.config.name_or_path = str(adapter_dir)
    try:
        yield ModelAdapter(peft_model.get_base_model(), adapter.tokenizer, adapter.blocks_path)
    finally:
        peft_model.unload()
        adapter.model.config.name_or_path = name
        adapter.model.eval()


def loss_on(adapter: ModelAdapter, rows: list[list[dict]], max_len: int = 1024) -> float:
    """Mean per-token loss on the assistant tokens of chats (a quick check that training learned)."""
    items = encode_dataset(adapter, rows, max_len)
    collate = ChatCollator(pad_id(adapter.tokenizer))
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(items), 8):
            batch = {k: v.to(adapter.device) for k, v in collate([ChatDataset(items)[i] for i in
                                                                   range(s, min(s + 8, len(items)))]).items()}
            logits = adapter.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            lab = batch["labels"][:, 1:]
            lp = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), lab, ignore_index=-100,
                                                   reduction="sum")
            total += float(lp)
            count += int((lab != -100).sum())
    return total / max(count, 1) if count else math.nan
