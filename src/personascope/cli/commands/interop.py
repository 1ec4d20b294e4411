"""CLI commands `vector export` / `vector import`: persona vectors to and from llama.cpp, repeng, EasySteer, lm-eval."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from personascope.model import DEFAULT_MODEL

from .common import ALPHA, COEF, LAYER, DeviceOpt, console, fail, ints, load_adapter

if TYPE_CHECKING:
    from personascope.interop import LmEvalExport

FORMATS = ("gguf", "lmeval")


def _builtin_gguf(model: str) -> str:
    """The GGUF llama.cpp can run for a built-in model (its path in the cache), else a placeholder."""
    from personascope.model import BUILTIN_MODELS, cache_dir

    spec = BUILTIN_MODELS.get(model)
    return str(cache_dir() / spec.name / spec.gguf_name) if spec else "MODEL.gguf"


def vector_export(
    path: Annotated[Path, typer.Argument(help="personascope vector file (.safetensors or the paper's .pt).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output file (.gguf for gguf, .pt for lmeval).")],
    format: Annotated[str, typer.Option("--format", help="gguf (llama.cpp / repeng / EasySteer control vector) or "
                                                         "lmeval (lm-evaluation-harness `steered` model).")] = "gguf",
    layers: Annotated[str | None, typer.Option("--layers", help="personascope layers to export, e.g. 10,12 "
                                                                "(default: the vector's chosen layer).")] = None,
    layer_range: Annotated[tuple[int, int] | None, LAYER.option("Export layers A..B (inclusive).",
                                                                "--layer-range")] = None,
    coef: Annotated[float | None, COEF.option("Raw coefficient baked into every exported layer.")] = None,
    alpha: Annotated[float | None, ALPHA.option("Relative coefficient, converted per layer "
                                                "(coef = alpha·resid_norm/‖v‖) and baked in.")] = None,
    span: Annotated[str, typer.Option(help="response_avg, prompt_avg or prompt_last.")] = "response_avg",
    model: Annotated[str | None, typer.Option("--model", "-m", help="The vector's model: needed for lmeval (block "
                                                                    "names); checked against the vector.")] = None,
    device: DeviceOpt = None,
) -> None:
    """Export a persona vector as a llama.cpp/repeng control vector (GGUF) or an lm-eval steering file."""
    from personascope.interop import (
        ControlVectorError,
        GgufExport,
        choose_coefs,
        export_gguf,
        model_type_of,
        parse_layers,
    )
    from personascope.vectors import VectorMismatchError, load_vector

    if format not in FORMATS:
        fail(f"unknown --format {format!r}; choose from {', '.join(FORMATS)}")
    if layers is not None:
        ints(layers, "--layers", LAYER)
    if format == "lmeval" and model is None:
        fail("--format lmeval needs --model (the harness hooks blocks by their module names)")
    try:
        pv = load_vector(path)
        adapter = load_adapter(model, device) if model else None
        if adapter is not None:
            pv.check(adapter)
        rows = parse_layers(pv, layers, layer_range, min_row=2 if format == "gguf" else 1)
        choice = choose_coefs(pv, rows, coef, alpha, span)
        if format == "gguf":
            hint = model_type_of(adapter.architecture) if adapter else None
            res: GgufExport | LmEvalExport = export_gguf(pv, out, choice, span, model_hint=hint)
        else:
            from personascope.interop import export_lmeval

            if adapter is None:  # checked above; narrows the type
                fail("--format lmeval needs --model")
            res = export_lmeval(pv, adapter, out, choice, span)
    except (FileNotFoundError, ValueError, VectorMismatchError, ControlVectorError) as e:
        fail(str(e))
    for w in res.warnings:
        console.print(f"[yellow]note:[/] {w}")
    coefs = ", ".join(f"layer {r}: {c:.4g}" for r, c in res.coefs.items())
    console.print(f"wrote {res.path} ({pv.trait}; coefficient in the file per layer: {coefs})")
    if isinstance(res, GgufExport):
        a, b = res.layer_range
        console.print(f"llama.cpp blocks {a}..{b} (personascope layers {a + 1}..{b + 1}); run e.g.\n"
                      f"  llama-cli -m {_builtin_gguf(model or '')} {res.llama_cpp_args()}")
    else:
        from personascope.model import resolve_model_path

        hooks = ", ".join(f"layer {r} -> {h}" for r, h in res.hookpoints.items())
        local = resolve_model_path(model or "")
        local = str(Path(local).resolve()) if Path(local).exists() else local
        console.print(f"hookpoints: {hooks}\nrun e.g.\n  {res.command(local)}")


def vector_import(
    path: Annotated[Path, typer.Argument(help="Control vector .gguf (llama.cpp, repeng, EasySteer or personascope).")],
    model: Annotated[str, typer.Option("--model", "-m", help="The model it is for (shape and metadata "
                                                             "check).")] = DEFAULT_MODEL,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output vector file (default: FILE.safetensors "
                                                                 "next to the input).")] = None,
    trait: Annotated[str | None, typer.Option(help="Trait name to record (default: from the file).")] = None,
    device: DeviceOpt = None,
) -> None:
    """Import a GGUF control vector as a personascope vector, for evaluate, monitor or screen."""
    from personascope.interop import ControlVectorError, import_gguf
    from personascope.vectors import VectorMismatchError

    dest = out or path.with_suffix(".safetensors")
    if out is None and dest.exists():
        fail(f"{dest} already exists; choose the output file with --out")
    adapter = load_adapter(model, device)
    try:
        pv = import_gguf(path, adapter, trait)
    except (FileNotFoundError, ValueError, VectorMismatchError, ControlVectorError) as e:
        fail(str(e))
    dest = pv.save(dest)
    console.print(f"wrote {dest}: trait {pv.trait!r}, {pv.metadata['source']}, layers "
                  f"{pv.metadata['control_rows']} (chosen layer {pv.best_layer})")
    if "baked_coefs" not in pv.metadata:
        console.print("the rows are the file's directions: --coef C --positions all matches llama.cpp "
                      "--control-vector-scaled FILE:C")


def register(vector_app: typer.Typer) -> None:
    """Attach `export` and `import` to the `vector` command group."""
    vector_app.command("export")(vector_export)
    vector_app.command("import")(vector_import)
