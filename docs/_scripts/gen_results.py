"""Put the lab notebook into the site at its repository paths (mkdocs-gen-files): experiments/RESULTS.md, the
runs' reports and figures under experiments/results/, and bench/RESULTS.md. A link from them into docs/ drops
the `docs/` (docs/ is the site's root), so the same relative links work on GitHub and in the site."""

import re
from pathlib import Path

import mkdocs_gen_files

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [ROOT / "experiments" / "RESULTS.md", ROOT / "bench" / "RESULTS.md",
           *sorted((ROOT / "experiments" / "results").rglob("*.md")),
           *sorted((ROOT / "experiments" / "results").rglob("*.png"))]
INTO_DOCS = re.compile(r"\]\(((?:\.\./)+)docs/")

for src in SOURCES:
    if not src.exists():
        continue
    rel = src.relative_to(ROOT).as_posix()
    if src.suffix == ".md":
        text = INTO_DOCS.sub(r"](\1", src.read_text(encoding="utf-8"))
        with mkdocs_gen_files.open(rel, "w") as f:
            f.write(text)
    else:
        with mkdocs_gen_files.open(rel, "wb") as f:
            f.write(src.read_bytes())
