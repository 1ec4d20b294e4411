"""CLI commands for serving: `serve` (OpenAI-compatible server + dashboard) and `traits new`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer


def _parse_vector_spec(spec: str) -> tuple[str | None, Path]:
    """'NAME=FILE' or just 'FILE' (the name then comes from the vector's trait)."""
    if "=" in spec:
        name, path = spec.split("=", 1)
        return name.strip(), Path(path)
    return None, Path(spec)


def _drift_service(engine, store, names: list[str], loaded: dict, rule_args: tuple, calibrate_n: int,
                   auto_guard: str | None, keep_text: bool):
    """The server's DriftService: each monitored vector with its normal range (measured now if its file has
    none) and, for --auto-guard, its guard item; a problem is one `error:` line."""
    from personascope.monitor import DriftRule
    from personascope.serve import DriftService, GuardItem

    from .common import console, fail
    from .drift import drift_vector

    dvs, guards = [], {}
    for name in names:
        try:
            with console.status(f"normal range of {name} …"):
                dv, cal = drift_vector(engine.adapter, name, loaded[name], None, calibrate_n)
        except ValueError as e:
            fail(f"--monitor {name}: {e}")
        dvs.append(dv)
        if dv.normal is None:
            console.print(f"[yellow]warning:[/] {name} has no normal range at layer {dv.layer}: its raw projections "
                          "are recorded, but it never raises an alert (calibrate it, or leave --drift-calibrate on)")
        if cal is not None:
            guards[name] = GuardItem(name, cal.layer, auto_guard or "cap", None, cal.hi, None, "response")
    try:
        return DriftService(engine, store, dvs, DriftRule(*rule_args), auto_guard, guards, keep_text)
    except ValueError as e:
        fail(str(e))


def register(app: typer.Typer, traits_app: typer.Typer) -> None:
    """Add the serve commands to the main app."""

    @app.command()
    def serve(
        model: Annotated[str, typer.Option("--model", "-m", help="Built-in short name, local path or HF name.")],
        vector: Annotated[list[str] | None, typer.Option(
            "--vector", help="NAME=FILE of a persona vector to offer (repeatable); checked against the model.")] = None,
        host: Annotated[str, typer.Option(help="Address to bind (loopback by default; others need --api-key "
                                               "to be safe).")] = "127.0.0.1",
        port: Annotated[int, typer.Option()] = 8000,
        api_key: Annotated[str | None, typer.Option(
            "--api-key", help="Require 'Authorization: Bearer KEY' (or set PERSONASCOPE_API_KEY).")] = None,
        device: Annotated[str | None, typer.Option(help="cuda, mps or cpu (default: best available).")] = None,
        dtype: Annotated[str | None, typer.Option(help="bf16, fp16 or fp32 (default: bf16 where supported).")] = None,
        max_batch: Annotated[int, typer.Option(help="Rows decoded together in one batch (1: greedy answers never "
                                                    "depend on other requests, even in bf16).")] = 8,
        batch_wait_ms: Annotated[float, typer.Option(help="How long to wait for more requests to batch.")] = 5.0,
        max_tokens_limit: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for.")] = 1024,
        max_body_bytes: Annotated[int, typer.Option(help="Largest request body accepted.")] = 1_000_000,
        max_queue: Annotated[int, typer.Option(help="Requests waiting before new ones get 429.")] = 256,
        body_timeout_s: Annotated[float, typer.Option(
            help="Seconds a client has to send its whole request body (then 408).")] = 30.0,
        drain_timeout_s: Annotated[float, typer.Option(
            help="On SIGTERM/SIGINT: seconds running requests get to finish before they are ended with an "
                 "error (503).")] = 10.0,
        monitor: Annotated[str | None, typer.Option(
            "--monitor", help="NAME[,NAME]: record every conversation's trajectory on these --vector names "
                              "(docs/drift.md).")] = None,
        drift_db: Annotated[str | None, typer.Option(
            "--drift-db", help="SQLite file or postgresql:// URL for the trajectories (default with --monitor: "
                               "drift.sqlite3 here).")] = None,
        drift_z: Annotated[float, typer.Option(help="Alert when a z-score is at least this ...")] = 2.0,
        drift_turns: Annotated[int, typer.Option(help="... on this many consecutive turns.")] = 2,
        drift_rise: Annotated[float | None, typer.Option(help="Also alert on a z rise this large since turn 0.")
                              ] = None,
        drift_span: Annotated[str, typer.Option(help="pre (last token before the turn) or response (its mean).")
                              ] = "pre",
        drift_calibrate: Annotated[int, typer.Option(help="Pool questions for a normal range a vector file lacks "
                                                          "(0: record raw projections only).")] = 32,
        auto_guard: Annotated[str | None, typer.Option(
            "--auto-guard", help="cap or conditional: after an alert, guard that conversation from its next turn "
                                 "(needs calibrated vectors).")] = None,
        drift_text: Annotated[bool, typer.Option(help="Keep the turns' text in the drift database.")] = True,
    ) -> None:
        """Serve the model over an OpenAI-compatible API with persona steering, monitoring and a dashboard."""
        from personascope.vectors import VectorMismatchError, load_vector

        from ...serve import (
            VECTOR_NAME,
            Engine,
            ServeConfig,
            bind_socket,
            load_serving_model,
            option_problem,
            run_server,
        )
        from .common import console, fail

        options = {"max_batch": max_batch, "batch_wait_ms": batch_wait_ms, "max_tokens_limit": max_tokens_limit,
                   "max_body_bytes": max_body_bytes, "max_queue": max_queue, "body_timeout_s": body_timeout_s,
                   "drain_timeout_s": drain_timeout_s, "port": port}
        for option, value in options.items():
            problem = option_problem(option, value)
            if problem is not None:
                fail(f"--{option.replace('_', '-')} {problem}")
        key = api_key or os.environ.get("PERSONASCOPE_API_KEY") or None
        loaded = {}
        for spec in vector or []:
            name, path = _parse_vector_spec(spec)
            try:
                pv = load_vector(path)
            except (FileNotFoundError, ValueError) as e:
                fail(str(e))
            name = name or pv.trait
            if not VECTOR_NAME.match(name):
                fail(f"vector name {name!r} must be 1-64 letters, digits, '_', '-' or '.'")
            if name in loaded:
                fail(f"two vectors are named {name!r}; use NAME=FILE to name them apart")
            loaded[name] = pv
        try:  # before the model loads: a busy port or an unknown host is told at once
            sock = bind_socket(host, port)
        except OSError as e:
            fail(f"cannot listen on {host}:{port}: {e.strerror or e}")
        if host not in ("127.0.0.1", "localhost", "::1") and key is None:
            console.print(f"[yellow]warning:[/] binding to {host} without --api-key: anyone who can reach this "
                          "address can use the model")
        try:
            with console.status(f"loading {model} …"):
                adapter = load_serving_model(model, device=device, dtype=dtype)
        except Exception as e:  # unknown model, missing packages, bad dtype
            fail(f"cannot load model {model!r}: {e}")
        cfg = ServeConfig(max_batch=max_batch, batch_wait_ms=batch_wait_ms, max_tokens_limit=max_tokens_limit,
                          default_max_tokens=min(256, max_tokens_limit), max_body_bytes=max_body_bytes,
                          max_queue=max_queue, body_timeout_s=body_timeout_s, drain_timeout_s=drain_timeout_s,
                          api_key=key, host=host)
        from personascope.steering import GUARD_MODES

        names = [n.strip() for n in (monitor or "").split(",") if n.strip()]
        unknown = [n for n in names if n not in loaded]
        if unknown:
            fail(f"--monitor {','.join(unknown)}: no --vector of that name (loaded: {', '.join(loaded) or 'none'})")
        if auto_guard is not None and (auto_guard not in GUARD_MODES or not names):
            fail(f"--auto-guard must be cap or conditional and needs --monitor, got {auto_guard!r}")
        if drift_span not in ("pre", "response") or drift_turns < 1:
            fail("--drift-span must be pre or response and --drift-turns at least 1")
        store = None
        if names or drift_db:
            from personascope.serve import DriftStore, StoreError

            try:
                store = DriftStore(drift_db or "drift.sqlite3")
            except StoreError as e:
                fail(str(e))
        try:
            engine = Engine(adapter, loaded, cfg, model_id=model)
        except VectorMismatchError as e:
            fail(str(e))
        drift = _drift_service(engine, store, names, loaded, (drift_z, drift_turns, drift_rise, drift_span),
                               drift_calibrate, auto_guard, drift_text)
        for name, pv in loaded.items():
            console.print(f"vector [bold]{name}[/] ({pv.trait}, default layer {pv.default_layer()}) from {pv.path}")
        console.print(f"serving [bold]{model}[/] on http://{host}:{port}  (dashboard at /, API at /v1)"
                      + ("  [auth: bearer key]" if key else ""))
        if store is not None:
            console.print(f"recording conversations to {store.where} ({', '.join(names) or 'per request'})")
        run_server(engine, host, port, sock=sock, drift=drift)

    @traits_app.command("new")
    def traits_new(
        name: Annotated[str, typer.Argument(help="Trait name (one word, e.g. 'pessimistic').")],
        description: Annotated[str, typer.Option(help="What the trait is, in a sentence or two.")],
        generator_model: Annotated[str, typer.Option(
            help="Model at --generator-url, or a local model name or path (small local models write poor data: "
                 "prefer a capable API model).")],
        generator_url: Annotated[str | None, typer.Option(
            help="OpenAI-compatible base URL (e.g. http://127.0.0.1:8000/v1); without it a local model is used.")
        ] = None,
        api_key_env: Annotated[str, typer.Option(help="Environment variable holding the endpoint's key.")
                               ] = "OPENAI_API_KEY",
        out: Annotated[Path, typer.Option(help="Folder; the trait is written to OUT/NAME/.")] = Path("traits"),
        attempts: Annotated[int, typer.Option(help="Tries, each told the previous try's problems.")] = 3,
        max_tokens: Annotated[int, typer.Option(help="Longest generator answer.")] = 4096,
        device: Annotated[str | None, typer.Option()] = None,
        force: Annotated[bool, typer.Option(help="Overwrite an existing trait folder.")] = False,
    ) -> None:
        """Write trait data (instructions, questions, rubric) from a description, using an LLM."""
        from personascope.traits import TraitGenError, generate_trait, make_generator, write_trait

        from .common import console, fail

        target = out / name
        if (target / "extract.json").exists() and not force:
            fail(f"{target} already holds a trait; pass --force to overwrite it")
        try:
            gen = make_generator(generator_model, generator_url, api_key_env, device)
            data = generate_trait(gen, name, description, attempts=attempts, max_tokens=max_tokens,
                                  log=lambda msg: console.print(msg, markup=False))
        except TraitGenError as e:
            fail(str(e))
        path = write_trait(data, out, name)
        console.print(f"wrote [bold]{path}[/] (extract.json, eval.json); check it with: "
                      f"personascope traits show {path}")
