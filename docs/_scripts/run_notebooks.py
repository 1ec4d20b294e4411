"""Run every tutorial notebook top to bottom (`make notebook`, CI): fail on the first error or on the time limit.

The executed copies go to build/notebooks/ (the committed notebooks stay without outputs); the working
directory of each run is a scratch folder, so the files a notebook writes land there.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("notebooks", nargs="*", type=Path, help="default: docs/tutorials/*.ipynb")
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "notebooks")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    ap.add_argument("--budget", type=float, default=300, help="seconds per notebook before it counts as too slow")
    args = ap.parse_args()
    notebooks = args.notebooks or sorted((ROOT / "docs" / "tutorials").glob("*.ipynb"))
    args.out.mkdir(parents=True, exist_ok=True)
    failed = False
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as work:
            NotebookClient(nb, timeout=args.timeout, kernel_name="python3",
                           resources={"metadata": {"path": work}}).execute()
        seconds = time.perf_counter() - start
        nbformat.write(nb, args.out / path.name)
        slow = seconds > args.budget
        failed |= slow
        over = f" (over the budget of {args.budget:.0f} s)" if slow else ""
        print(f"{path.relative_to(ROOT)}: ran in {seconds:.0f} s{over} -> {(args.out / path.name).relative_to(ROOT)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
