"""Run every tutorial notebook top to bottom (`make notebook`, CI): fail on the first error or on the time limit.

The executed copies go to build/notebooks/ (the committed notebooks stay without outputs); the working
directory of each run is a scratch folder, so the files a notebook writes land there.
"""

from __future__ import annotations

import argparse
import resource
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
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per cell before the run fails")
    ap.add_argument("--budget", type=float, default=300,
                    help="wall seconds per notebook before it counts as too slow and fails (0: no limit)")
    args = ap.parse_args()
    notebooks = args.notebooks or sorted((ROOT / "docs" / "tutorials").glob("*.ipynb"))
    args.out.mkdir(parents=True, exist_ok=True)
    failed = False
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        start = time.perf_counter()
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        with tempfile.TemporaryDirectory() as work:
            NotebookClient(nb, timeout=args.timeout, kernel_name="python3",
                           resources={"metadata": {"path": work}}).execute()
        seconds = time.perf_counter() - start
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the kernel, once it has exited
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        nbformat.write(nb, args.out / path.name)
        slow = bool(args.budget) and seconds > args.budget
        failed |= slow
        over = f" (over the budget of {args.budget:.0f} s)" if slow else ""
        copy = (args.out / path.name).relative_to(ROOT)
        print(f"{path.relative_to(ROOT)}: ran in {seconds:.0f} s (kernel CPU {cpu:.0f} s){over} -> {copy}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
