"""Persona vector files: `.safetensors` with three spans, the residual norm and metadata."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from personascope.model import SPANS, ModelAdapter

from .._version import __version__

log = logging.getLogger(__name__)


class VectorMismatchError(ValueError):
    """A persona vector does not fit the model it is used with."""


class VectorFileError(ValueError):
    """A vector file that cannot be read or whose contents are inconsistent (the message names the file)."""


@dataclass
class PersonaVector:
    """One trait's vectors for every layer index 0..L (row l = output of block l - 1)."""

    vectors: dict[str, torch.Tensor]  # span -> [L + 1, d] float32
    resid_norm: torch.Tensor | None = None  # [L + 1]
    metadata: dict[str, str] = field(default_factory=dict)
    path: str | None = None

    @property
    def trait(self) -> str:
        return self.metadata.get("trait", "unknown")

    @property
    def n_layers(self) -> int:
        """L: the number of decoder blocks of the model it came from."""
        return self.vectors["response_avg"].shape[0] - 1

    @property
    def hidden_size(self) -> int:
        return self.vectors["response_avg"].shape[1]

    @property
    def best_layer(self) -> int | None:
        value = self.metadata.get("best_layer")
        return int(value) if value not in (None, "") else None

    @property
    def post_norm_rows(self) -> list[int]:
        """Rows taken after the model's final norm (a paper `.pt` file's last row): not usable as row l here."""
        try:
            rows = json.loads(self.metadata.get("post_norm_rows") or "[]")
        except ValueError:
            return []
        return [int(r) for r in rows] if isinstance(rows, list) else []

    def vector(self, layer: int, span: str = "response_avg") -> torch.Tensor:
        if span not in self.vectors:
            raise ValueError(f"span {span!r} is not in this vector file (it has {', '.join(self.vectors)})")
        if not 0 <= layer <= self.n_layers:
            raise ValueError(f"layer {layer} is out of range for this {self.trait!r} vector: 0..{self.n_layers}")
        if layer in self.post_norm_rows:
            raise ValueError(f"row {layer} of {self.path or 'this vector'} was taken after the model's final norm "
                             f"(the paper's hidden_states[{layer}]), but personascope's layer {layer} is the "
                             f"un-normed block output; use a layer below {layer}")
        return self.vectors[span][layer]

    def default_layer(self, layer: int | None = None) -> int:
        """The layer to use: the one given, else the chosen best layer, else two thirds of the way up."""
        if layer is not None:
            return layer
        if self.best_layer is not None:
            return self.best_layer
        return round(self.n_layers * 2 / 3)

    def coef_from_alpha(self, alpha: float, layer: int, span: str = "response_avg") -> float:
        """Raw coefficient for a relative one: alpha = coef · ||v[l]|| / resid_norm[l]."""
        if self.resid_norm is None:
            raise ValueError(f"{self.path or 'the vector'} has no resid_norm, so an alpha cannot be converted to a "
                             "coefficient; give a raw coefficient instead")
        return float(alpha * self.resid_norm[layer] / self.vector(layer, span).norm().clamp(min=1e-12))

    def alpha_from_coef(self, coef: float, layer: int, span: str = "response_avg") -> float | None:
        if self.resid_norm is None:
            return None
        return float(coef * self.vector(layer, span).norm() / self.resid_norm[layer].clamp(min=1e-12))

    def check(self, adapter: ModelAdapter) -> None:
        """Raise VectorMismatchError naming what differs between this vector and the model."""
        src = f"{self.path or 'vector'} (trait {self.trait!r}, model {self.metadata.get('model', '?')})"
        if self.hidden_size != adapter.hidden_size:
            raise VectorMismatchError(f"{src} has hidden size {self.hidden_size}, but {adapter.name} has "
                                      f"{adapter.hidden_size}: it was extracted from a different model")
        if self.n_layers != adapter.n_layers:
            raise VectorMismatchError(f"{src} has {self.n_layers + 1} layer rows (L={self.n_layers}), but "
                                      f"{adapter.name} has L={adapter.n_layers} blocks")
        want = self.metadata.get("config_hash")
        if want and want != adapter.config_hash:
            raise VectorMismatchError(f"{src} was extracted from a model with config hash {want}, but "
                                      f"{adapter.name} has {adapter.config_hash}: a different architecture")

    def validate(self) -> PersonaVector:
        """Raise VectorFileError unless every span is a finite float [L + 1, d] tensor, resid_norm a finite
        [L + 1] one and `best_layer` an integer in 0..L; returns self."""
        src = self.path or "vector"

        def bad(problem: str) -> VectorFileError:
            return VectorFileError(f"{src}: {problem}")

        if "response_avg" not in self.vectors:
            raise bad(f"no 'response_avg' tensor (has {sorted(self.vectors)})")
        shape = tuple(self.vectors["response_avg"].shape)
        if len(shape) != 2 or shape[0] < 2 or shape[1] < 1:
            raise bad(f"'response_avg' must be a [L + 1, d] matrix with L >= 1, got shape {list(shape)}")
        for name, t in self.vectors.items():
            if not t.is_floating_point():
                raise bad(f"'{name}' has dtype {t.dtype}; a vector must be floating point")
            if tuple(t.shape) != shape:
                raise bad(f"'{name}' has shape {list(t.shape)}, but 'response_avg' has {list(shape)}")
            if not bool(torch.isfinite(t).all()) or not bool(torch.isfinite(t.float().norm(dim=-1)).all()):
                raise bad(f"'{name}' holds non-finite values (NaN or inf) or overflows its norm")
        if self.resid_norm is not None:
            r = self.resid_norm
            if not r.is_floating_point() or tuple(r.shape) != (shape[0],):
                raise bad(f"'resid_norm' must be a float vector of length L + 1 = {shape[0]}, got {r.dtype} "
                          f"{list(r.shape)}")
            if not bool(torch.isfinite(r).all()) or bool((r < 0).any()):
                raise bad("'resid_norm' holds non-finite or negative values")
        value = self.metadata.get("best_layer")
        if value not in (None, ""):
            try:
                layer = int(str(value))
            except ValueError:
                raise bad(f"metadata best_layer {value!r} is not an integer") from None
            if not 0 <= layer <= shape[0] - 1:
                raise bad(f"metadata best_layer {layer} is outside the vector's layers 0..{shape[0] - 1}")
        for key, want in (("n_layers", shape[0] - 1), ("hidden_size", shape[1])):
            value = self.metadata.get(key)
            if value not in (None, "") and str(value) != str(want):
                raise bad(f"metadata {key} {value!r} does not match the tensors' {want}")
        for key, check in (("guard", _guard_problem), ("validity", _validity_problem)):
            raw = self.metadata.get(key)
            if raw in (None, ""):
                continue
            try:
                data = json.loads(raw) if isinstance(raw, str | bytes) else raw
            except (ValueError, RecursionError) as e:
                raise bad(f"metadata '{key}' is not valid JSON ({' '.join(str(e).split())[:120]})") from None
            problem = check(data, shape[0] - 1)
            if problem is not None:
                raise bad(f"metadata '{key}' {problem}")
        return self

    def save(self, path: str | Path) -> Path:
        """Write the file atomically (safetensors writes a `.tmpXXXXXX` sibling and renames it); the stale
        temporaries of saves killed in that folder before are removed first."""
        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a directory; name the vector file to write")
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path.parent)
        tensors = {s: v.float().contiguous() for s, v in self.vectors.items()}
        if self.resid_norm is not None:
            tensors["resid_norm"] = self.resid_norm.float().contiguous()
        meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in self.metadata.items()}
        save_file(tensors, str(path), metadata=meta)
        self.path = str(path)
        return path

    def with_metadata(self, **updates) -> PersonaVector:
        meta = {**self.metadata, **{k: str(v) for k, v in updates.items()}}
        return PersonaVector(dict(self.vectors), self.resid_norm, meta, self.path)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return (isinstance(x, float) and math.isfinite(x)) or (_is_int(x) and abs(x) <= 1e300)  # type: ignore[arg-type]


def _guard_problem(data: object, n_layers: int) -> str | None:
    """What is wrong with a guard calibration (`personascope guard calibrate`), or None."""
    if not isinstance(data, dict):
        return f"must be a JSON object, got {type(data).__name__}"
    missing = [k for k in ("layer", "lo", "hi", "percentile", "n") if k not in data]
    if missing:
        return f"lacks {', '.join(missing)}"
    if not _is_int(data["layer"]) or not 0 <= data["layer"] <= n_layers:
        return f"layer {data['layer']!r} is not a layer of the vector (0..{n_layers})"
    for k in ("lo", "hi", "percentile", "mean", "std"):
        if k in data and not _is_number(data[k]):
            return f"{k} {data[k]!r} is not a finite number"
    if data["lo"] > data["hi"]:
        return f"lo {data['lo']} is above hi {data['hi']}"
    if not 0 <= data["percentile"] <= 100:
        return f"percentile {data['percentile']} is not in 0..100"
    for k in ("n", "n_questions"):
        if k in data and not (_is_int(data[k]) and data[k] >= 0):
            return f"{k} {data[k]!r} is not a count"
    if "distribution" in data and not isinstance(data["distribution"], str):
        return f"distribution {data['distribution']!r} is not a name"
    return None


def _validity_problem(data: object, n_layers: int) -> str | None:
    """What is wrong with a stored validity report (ValidityReport.to_dict), or None."""
    if not isinstance(data, dict):
        return f"must be a JSON object, got {type(data).__name__}"
    layers = data.get("layers")
    if not isinstance(layers, list) or not all(_is_int(x) and 0 <= x <= n_layers for x in layers):
        return f"layers must be a list of layer indices 0..{n_layers}"
    for k in ("held_out_auroc", "split_half_cosine", "ladder_spearman", "label_auroc", "label_spearman"):
        curve = data.get(k)
        if curve is None and k not in ("held_out_auroc", "split_half_cosine"):
            continue
        if not isinstance(curve, list) or len(curve) != len(layers) or \
                not all(x is None or _is_number(x) for x in curve):
            return f"{k} must be a list of {len(layers)} numbers or nulls (one per layer)"
    layer = data.get("layer")
    if layer is not None and (not _is_int(layer) or layer not in layers):
        return f"layer {layer!r} is not one of its layers"
    counts, notes = data.get("counts", {}), data.get("notes", [])
    if not isinstance(counts, dict) or not all(_is_int(v) for v in counts.values()):
        return "counts must be an object of integers"
    if not isinstance(notes, list) or not all(isinstance(x, str) for x in notes):
        return "notes must be a list of strings"
    return None


STALE_AFTER_S = 60.0  # a safetensors temporary older than this belongs to a save that was killed


def remove_stale_temporaries(folder: Path) -> int:
    """Delete the `.tmpXXXXXX` files safetensors leaves in `folder` when a save is killed; returns how many."""
    import re
    import time

    removed = 0
    now = time.time()
    for p in folder.glob(".tmp*"):
        try:
            if (re.fullmatch(r"\.tmp[A-Za-z0-9_]{6}", p.name) and p.is_file() and not p.is_symlink()
                    and now - p.stat().st_mtime > STALE_AFTER_S):
                p.unlink()
                removed += 1
        except OSError:  # another process removed or is replacing it
            continue
    if removed:
        log.info(f"{folder}: removed {removed} temporary file(s) of interrupted vector saves")
    return removed


PACKAGED_MODEL = "qwen2.5-coder-0.5b"  # the model a bare ready-made vector name refers to


def _packaged_dir() -> Path:
    return Path(str(resources.files("personascope").joinpath("data", "vectors")))


def packaged_vectors() -> list[tuple[str, str, Path]]:
    """The ready-made vectors that ship with the package: (model, trait, file), sorted."""
    root = _packaged_dir()
    if not root.is_dir():
        return []
    return sorted((d.name, f.name.removesuffix(".safetensors"), f) for d in root.iterdir() if d.is_dir()
                  for f in d.glob("*.safetensors"))


def find_packaged(name: str, model: str | None = None) -> Path | None:
    """The ready-made vector called `name` ("optimistic" or "MODEL/optimistic"): for `model` when the package
    has one for it, else for the default built-in model; None when there is none."""
    if "/" in name:
        want_model, trait = name.rsplit("/", 1)
        models = [want_model]
    else:
        trait, models = name, [m for m in (model, PACKAGED_MODEL) if m]
    found = {(m, t): f for m, t, f in packaged_vectors()}
    return next((found[(m, trait)] for m in models if (m, trait) in found), None)


def load_vector(path: str | Path, trait: str | None = None, model: str | None = None) -> PersonaVector:
    """Load a personascope `.safetensors` file, the paper's `{trait}_response_avg_diff.pt`, or a ready-made
    vector by name (`personascope vector list`; `model` picks that model's one when the package has it)."""
    path = Path(path)
    if not path.exists():
        packaged = find_packaged(str(path), model) if path.suffix not in (".pt", ".safetensors") else None
        if packaged is None:
            names = sorted({t for _, t, _ in packaged_vectors()})
            hint = f" (ready-made vectors: {', '.join(names)}; `personascope vector list`)" if names else ""
            raise FileNotFoundError(f"vector file {path} does not exist{hint}")
        path = packaged
    if path.suffix == ".pt":
        try:
            t = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated, empty, garbage or pickled code
            raise VectorFileError(f"{path}: not a readable .pt tensor file ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None
        if not isinstance(t, torch.Tensor) or t.ndim != 2:
            raise VectorFileError(f"{path}: expected a [L + 1, d] tensor, got "
                                  f"{list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        name = trait or path.name.split("_response_avg")[0].split("_prompt")[0]
        last = t.shape[0] - 1
        meta = {"trait": name, "source": "paper .pt", "post_norm_rows": json.dumps([last])}
        pv = PersonaVector({"response_avg": t}, None, meta, str(path))
        pv.validate()
        log.warning(f"{path}: row {last} of a paper .pt vector is hidden_states[{last}], taken after the final norm; "
                    f"personascope's layer {last} is the un-normed block output, so that row is refused (layers "
                    f"0..{last - 1} mean the same in both)")
        return PersonaVector({"response_avg": t.float()}, None, pv.metadata, str(path))
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            keys = set(f.keys())
            vectors = {s: f.get_tensor(s) for s in SPANS if s in keys}
            norm = f.get_tensor("resid_norm") if "resid_norm" in keys else None
    except Exception as e:  # truncated, empty or not a safetensors file
        raise VectorFileError(f"{path}: not a readable .safetensors vector file ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None
    return PersonaVector(vectors, norm, meta, str(path)).validate()


def compute_dtype(adapter: ModelAdapter) -> str:
    """The dtype the model computes in ("bfloat16", "float32", …): answers and activations depend on it.

    "unknown" for a weightless stand-in (a cluster's driver: the actors hold the weights)."""
    model = getattr(adapter, "model", None)
    dtype = getattr(model, "dtype", None)
    device = getattr(model, "device", None)
    if dtype is None or getattr(device, "type", None) == "meta":
        return "unknown"
    return str(dtype).removeprefix("torch.")


def base_metadata(adapter: ModelAdapter, trait: str, **extra) -> dict[str, str]:
    """Metadata every vector file carries."""

    meta = {
        "trait": trait,
        "model": adapter.name,
        "architecture": adapter.architecture,
        "hidden_size": str(adapter.hidden_size),
        "n_layers": str(adapter.n_layers),
        "config_hash": adapter.config_hash,
        "dtype": compute_dtype(adapter),
        "personascope_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()})
    return meta
