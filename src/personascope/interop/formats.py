"""GGUF control vectors (llama.cpp, repeng, EasySteer): export persona vectors to them and import them back.

llama.cpp adds the tensor `direction.N` to the output of block N (counted from 0) at every position.
Our row l is the output of block l - 1, so row l is written as `direction.{l-1}`. Row 0 (the
embedding output) has no slot, and row 1 would be `direction.0`, which llama.cpp rejects: both
are refused on export.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from personascope.model import ModelAdapter
from personascope.steering import Steerer
from personascope.vectors import PersonaVector, VectorMismatchError, base_metadata

ARCH = "controlvector"
PREFIX = "personascope."
EVERY_POSITION_WARNING = (
    "llama.cpp (and repeng / EasySteer) add a control vector at every position, prompt included; "
    "personascope's `response` and `prompt` positions cannot be reproduced there, so the same coefficient "
    "steers harder than `--positions response`."
)


class ControlVectorError(ValueError):
    """A control vector file or an export request that cannot be honoured."""


@dataclass
class LayerChoice:
    """Rows to export and the raw coefficient of each (baked into the file)."""

    rows: list[int]
    coefs: dict[int, float]
    alpha: float | None = None


@dataclass
class ControlVectorFile:
    """The content of a GGUF control vector: `directions[N]` is added to the output of block N."""

    directions: dict[int, torch.Tensor]
    model_hint: str
    source_format: str  # personascope, easysteer or repeng/llama.cpp
    fields: dict[str, object] = field(default_factory=dict)  # every other key/value of the file
    path: str | None = None

    @property
    def hidden_size(self) -> int:
        return int(next(iter(self.directions.values())).shape[0])

    @property
    def rows(self) -> dict[int, torch.Tensor]:
        """The directions keyed by personascope layer (row N + 1 = output of block N)."""
        return {n + 1: v for n, v in sorted(self.directions.items())}

    @property
    def layer_range(self) -> tuple[int, int]:
        """The `--control-vector-layer-range` that covers every direction of the file."""
        return min(self.directions), max(self.directions)


@dataclass
class GgufExport:
    """What `export_gguf` wrote: rows, the block each went to, the baked-in coefficients and warnings."""

    path: Path
    rows: list[int]
    coefs: dict[int, float]
    warnings: list[str]

    @property
    def blocks(self) -> list[int]:
        return [r - 1 for r in self.rows]

    @property
    def layer_range(self) -> tuple[int, int]:
        return min(self.blocks), max(self.blocks)

    def llama_cpp_args(self, scale: float = 1.0) -> str:
        """The llama.cpp flags that apply this file at the exported blocks (older builds take `FILE SCALE`)."""
        a, b = self.layer_range
        return f"--control-vector-scaled {self.path}:{scale:g} --control-vector-layer-range {a} {b}"


def parse_layers(pv: PersonaVector, layers: str | None = None, layer_range: tuple[int, int] | None = None,
                 min_row: int = 2) -> list[int]:
    """Rows from `--layers 10,12` or `--layer-range A B` (inclusive; default: the vector's chosen layer)."""
    if layers is not None and layer_range is not None:
        raise ControlVectorError("give --layers or --layer-range, not both")
    if layer_range is not None:
        a, b = layer_range
        if a > b:
            raise ControlVectorError(f"--layer-range {a} {b}: the start is above the end")
        rows = list(range(a, b + 1))
    elif layers is not None:
        try:
            rows = [int(x) for x in layers.split(",") if x.strip()]
        except ValueError:
            raise ControlVectorError(f"--layers {layers!r}: expected comma-separated integers, e.g. 10,12") from None
        if not rows:
            raise ControlVectorError(f"--layers {layers!r} names no layer")
        if len(set(rows)) != len(rows):
            raise ControlVectorError(f"--layers {layers!r} names a layer twice")
    else:
        rows = [pv.default_layer()]
    for r in rows:
        if not 0 <= r <= pv.n_layers:
            raise ControlVectorError(f"layer {r} is out of range for this vector: its layers are 0..{pv.n_layers}")
        if r < min_row:
            raise ControlVectorError(
                f"layer {r} cannot be exported: llama.cpp adds direction.N to the output of block N with N >= 1, "
                f"and personascope layer l is the output of block l - 1, so only layers {min_row}..{pv.n_layers} "
                "have a slot (layer 0 is the embedding output, layer 1 would be the rejected direction.0)")
    return sorted(rows)


def choose_coefs(pv: PersonaVector, rows: list[int], coef: float | None = None, alpha: float | None = None,
                 span: str = "response_avg") -> LayerChoice:
    """Raw coefficient per row: `--coef` for every row, or `--alpha` converted per row; default 1 (stated)."""
    if coef is not None and alpha is not None:
        raise ControlVectorError("give --coef or --alpha, not both")
    values = [coef] if coef is not None else [alpha] if alpha is not None else []
    if any(not np.isfinite(v) or v == 0 for v in values):
        raise ControlVectorError(f"the coefficient must be finite and non-zero, got {values[0]}")
    if alpha is not None:
        try:
            coefs = {r: pv.coef_from_alpha(alpha, r, span) for r in rows}
        except ValueError as e:
            raise ControlVectorError(str(e)) from None
        return LayerChoice(rows, coefs, alpha)
    return LayerChoice(rows, {r: float(coef if coef is not None else 1.0) for r in rows})


def model_type_of(architecture: str) -> str:
    """A transformers `model_type` (repeng's model hint) from a class name such as Qwen2ForCausalLM."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for model_type, cls in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        if cls == architecture:
            return model_type
    return architecture


def export_gguf(pv: PersonaVector, out: str | Path, choice: LayerChoice, span: str = "response_avg",
                model_hint: str | None = None) -> GgufExport:
    """Write `coef_l · v[l]` as `direction.{l-1}` for the chosen rows, plus personascope metadata to undo it."""
    import gguf

    for r in choice.rows:
        if r < 2:
            raise ControlVectorError(f"layer {r} has no llama.cpp slot (only layers 2..{pv.n_layers})")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    hint = model_hint or model_type_of(pv.metadata.get("architecture", "")) or pv.metadata.get("model", "unknown")
    writer = gguf.GGUFWriter(str(out), ARCH)
    writer.add_string(f"{ARCH}.model_hint", hint)
    writer.add_uint32(f"{ARCH}.layer_count", len(choice.rows))
    meta = pv.metadata
    for key in ("trait", "model", "config_hash", "personascope_version"):
        if meta.get(key):
            writer.add_string(PREFIX + key, meta[key])
    writer.add_string(PREFIX + "span", span)
    writer.add_uint32(PREFIX + "n_layers", pv.n_layers)
    writer.add_array(PREFIX + "rows", [int(r) for r in choice.rows])
    writer.add_array(PREFIX + "coefs", [float(choice.coefs[r]) for r in choice.rows])
    if choice.alpha is not None:
        writer.add_float32(PREFIX + "alpha", float(choice.alpha))
    if pv.resid_norm is not None:
        writer.add_array(PREFIX + "resid_norm", [float(x) for x in pv.resid_norm])
    for r in choice.rows:
        v = (choice.coefs[r] * pv.vector(r, span).double()).float().numpy()
        writer.add_tensor(f"direction.{r - 1}", np.ascontiguousarray(v, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    notes = [EVERY_POSITION_WARNING]
    if choice.alpha is None and all(c == 1.0 for c in choice.coefs.values()):
        notes.append("no coefficient baked in (coef 1): give the coefficient as the scale of "
                     "--control-vector-scaled FILE:COEF")
    return GgufExport(out, list(choice.rows), dict(choice.coefs), notes)


def _field_value(f) -> object:
    """The Python value of a GGUF key/value field (strings decoded, arrays as lists)."""
    if hasattr(f, "contents"):
        return f.contents()
    import gguf

    if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
        if f.types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8", "replace") for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    if f.types and f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8", "replace")
    return f.parts[f.data[0]].tolist()[0]


def read_gguf(path: str | Path) -> ControlVectorFile:
    """Read a llama.cpp / repeng / EasySteer / personascope control vector (sums repeated directions)."""
    import gguf

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"control vector file {path} does not exist")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # not a GGUF file
        raise ControlVectorError(f"{path} is not a readable GGUF file ({e})") from None
    fields = {k: _field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    arch = fields.get("general.architecture")
    if arch not in (None, ARCH):
        raise ControlVectorError(f"{path}: general.architecture is {arch!r}, not {ARCH!r}: a model, not a control "
                                 "vector")
    directions: dict[int, torch.Tensor] = {}
    for t in reader.tensors:
        head, _, idx = t.name.partition(".")
        if head != "direction":
            continue
        try:
            n = int(idx)
        except ValueError:
            raise ControlVectorError(f"{path}: tensor {t.name!r} has no integer layer index") from None
        if n < 0:
            raise ControlVectorError(f"{path}: tensor {t.name!r} has a negative layer index")
        if sum(int(s) > 1 for s in t.shape) > 1:
            raise ControlVectorError(f"{path}: tensor {t.name!r} is not 1-D (shape {list(t.shape)})")
        if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            raise ControlVectorError(f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, expected F32")
        v = torch.from_numpy(np.asarray(t.data, dtype=np.float32).reshape(-1).copy())
        directions[n] = directions[n] + v if n in directions else v  # llama.cpp sums repeated layers
    if not directions:
        raise ControlVectorError(f"{path}: no direction.N tensors")
    sizes = {int(v.shape[0]) for v in directions.values()}
    if len(sizes) != 1:
        raise ControlVectorError(f"{path}: direction tensors have different lengths {sorted(sizes)}")
    hint = str(fields.pop(f"{ARCH}.model_hint", "") or "")
    if any(k.startswith(PREFIX) for k in fields):
        fmt = "personascope"
    elif f"{ARCH}.method" in fields:
        fmt = "easysteer"
    else:
        fmt = "repeng/llama.cpp"
    return ControlVectorFile(directions, hint, fmt, fields, str(path))


def _easysteer_meta(fields: dict[str, object]) -> dict[str, str]:
    """EasySteer's extra `controlvector.*` keys (method, explained variance, …) as `cv_*` metadata."""
    skip = {f"{ARCH}.layer_count", f"{ARCH}.model_hint"}
    out = {}
    for k, v in fields.items():
        if k.startswith(ARCH + ".") and k not in skip:
            out["cv_" + k[len(ARCH) + 1:].replace(".", "_")] = v if isinstance(v, str) else json.dumps(v)
    return out


def import_gguf(path: str | Path, adapter: ModelAdapter, trait: str | None = None) -> PersonaVector:
    """A PersonaVector (response_avg rows, zeros elsewhere) from a control vector file, checked against a model.

    For a file we exported, the baked-in coefficients are divided back out and the trait, span and
    resid_norm restored; for other files the rows are the file's directions (coef 1 = llama.cpp scale 1).
    """
    cv = read_gguf(path)
    src = cv.path or str(path)
    L, d = adapter.n_layers, adapter.hidden_size
    if cv.hidden_size != d:
        raise VectorMismatchError(f"{src} has directions of length {cv.hidden_size}, but {adapter.name} has hidden "
                                  f"size {d}: it was made for a different model")
    if max(cv.directions) >= L:
        raise VectorMismatchError(f"{src} steers block {max(cv.directions)}, but {adapter.name} has only {L} blocks "
                                  f"(0..{L - 1})")
    f = cv.fields
    ours = cv.source_format == "personascope"
    want_hash = f.get(PREFIX + "config_hash")
    if ours and want_hash and want_hash != adapter.config_hash:
        raise VectorMismatchError(f"{src} was exported from a model with config hash {want_hash}, but {adapter.name} "
                                  f"has {adapter.config_hash}: a different architecture")
    hint = model_type_of(adapter.architecture)
    if cv.model_hint and cv.model_hint not in (hint, adapter.name):
        warnings.warn(f"{src} has model hint {cv.model_hint!r}, the model is {adapter.name} ({hint})", stacklevel=2)
    rows = torch.zeros(L + 1, d)
    baked: dict[int, float] = {}
    if ours:
        baked = dict(zip(_seq(f.get(PREFIX + "rows")), _seq(f.get(PREFIX + "coefs")), strict=False))
    for r, v in cv.rows.items():
        rows[r] = v / baked[r] if baked.get(r) else v
    name = trait or (str(f.get(PREFIX + "trait") or "") if ours else None) or Path(src).stem
    norms = rows.norm(dim=-1)
    extra: dict[str, str] = {
        "source": f"{cv.source_format} control vector",
        "source_file": Path(src).name,
        "model_hint": cv.model_hint,
        "control_rows": json.dumps(sorted(cv.rows)),
        "best_layer": str(int(norms.argmax())),
        "positions_note": "the file's tool steers every position (positions=all)",
    }
    if ours:
        extra.update(baked_coefs=json.dumps({str(r): c for r, c in baked.items()}),
                     span_origin=str(f.get(PREFIX + "span", "response_avg")), source_model=str(f.get(PREFIX + "model")))
    extra.update(_easysteer_meta(f))
    resid = _seq(f.get(PREFIX + "resid_norm")) if ours else []
    resid_norm = torch.tensor(resid, dtype=torch.float32) if resid and len(resid) == L + 1 else None
    return PersonaVector({"response_avg": rows}, resid_norm, base_metadata(adapter, name, **extra))


def _seq(value: object) -> list:
    """A GGUF array field as a list ([] when the field is missing or not an array)."""
    return list(value) if isinstance(value, list | tuple) else []


def llama_cpp_steerer(adapter: ModelAdapter, cv: ControlVectorFile, scale: float = 1.0) -> Steerer:
    """A Steerer applying a control vector file as llama.cpp does: `scale · direction.N` after block N, everywhere."""
    st = Steerer(adapter)
    for row, v in cv.rows.items():
        st.add(v, row, scale, positions="all")
    return st
