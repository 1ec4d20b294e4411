"""Write the CLI reference (reference/cli.md) from the typer app at site-build time (mkdocs-gen-files)."""

import mkdocs_gen_files
import typer
import typer.main
from typer.cli import get_docs_for_click

from personascope.cli.main import app

command = typer.main.get_command(app)
ctx = typer.Context(command, info_name="personascope")
body = get_docs_for_click(obj=command, ctx=ctx, name="personascope", title="`personascope`")
# usage blocks are `console` fences; the docs test runs only python/bash fences, so these are reference text
page = (
    "# Command line\n\n"
    "Generated from the typer app (`personascope.cli.main`) at every site build, so it matches the installed\n"
    "version; `personascope COMMAND --help` prints the same.\n\n" + body.split("\n", 1)[1]
)
with mkdocs_gen_files.open("reference/cli.md", "w") as f:
    f.write(page)
