"""The model under study: loading, the adapter (chat template, EOS, padding), hooks, activations, generation."""

from .activations import SPANS, collect_spans, iter_span_batches, last_token_activations, project
from .adapter import (
    ModelAdapter,
    block_output,
    cache_kwarg,
    common_prefix,
    output_cache,
    pad_batch,
    pad_id,
    position_ids_for,
)
from .chat import MAX_ROW_BYTES, ChatError, DatasetError, check_messages, load_chat_jsonl, question_of, split_answer
from .generate import SamplingConfig, batch_seed, generate_batch, job_seed, run_generation
from .hooks import HookedOperation, ResidualFn, ResidualHooks, forward_with_residual_hooks
from .loading import (
    BUILTIN_MODELS,
    CALIBRATION_FILE,
    DEFAULT_JUDGE_MODEL,
    DEFAULT_MODEL,
    META_FILE,
    ModelNotFoundError,
    adapter_base_name,
    cache_dir,
    calibrated_cpu_dtype,
    is_adapter_dir,
    load_finetuned,
    load_model,
    machine_key,
    model_identity,
    pick_device,
    pick_dtype,
    resolve_model_path,
)

__all__ = [
    "BUILTIN_MODELS", "CALIBRATION_FILE", "ChatError", "DEFAULT_JUDGE_MODEL", "DEFAULT_MODEL", "DatasetError",
    "HookedOperation", "MAX_ROW_BYTES", "META_FILE", "ModelAdapter", "ModelNotFoundError", "ResidualFn",
    "ResidualHooks", "SPANS", "SamplingConfig", "adapter_base_name", "batch_seed", "block_output", "cache_dir",
    "cache_kwarg", "calibrated_cpu_dtype", "check_messages", "collect_spans", "common_prefix",
    "forward_with_residual_hooks",
    "generate_batch", "is_adapter_dir", "iter_span_batches", "job_seed", "last_token_activations", "load_chat_jsonl",
    "load_finetuned", "load_model", "machine_key", "model_identity", "output_cache", "pad_batch", "pad_id",
    "pick_device", "pick_dtype", "position_ids_for", "project", "question_of", "resolve_model_path", "run_generation",
    "split_answer",
]
