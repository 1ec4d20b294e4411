"""Blind labelling of real answers (docs/labelling.md): a reading sheet, then the labels merged into the set.

`sheet` writes every generated answer not yet in `data/judge_real/` to a text sheet that shows only the
trait, the question and the answer, in a shuffled order under opaque keys (the key → answer id map is
kept beside it); `merge` reads one line per key, `KEY LEVEL R|- I|- note…` (level 0/1/2, R = refusal,
I = incoherent), and appends the labelled rows to `data/judge_real/TRAIT.jsonl`, split by question.

    python experiments/real_answers/label.py sheet --out /tmp/sheet.txt
    python experiments/real_answers/label.py merge --sheet /tmp/sheet.txt --labels /tmp/labels.txt
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from personascope.judges import HELDOUT_FROM

HERE = Path(__file__).parent
REAL = HERE.parents[1] / "src" / "personascope" / "data" / "judge_real"


def labelled_ids() -> set[str]:
    return {json.loads(line)["id"] for p in REAL.glob("*.jsonl") for line in p.read_text().splitlines() if line}


def answers() -> dict[str, dict]:
    out = {}
    for p in sorted(HERE.glob("answers-*.jsonl")):
        for line in p.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                out[r["id"]] = r
    return out


def write_sheet(out: Path, seed: int) -> int:
    """The reading sheet and its key file (`out` + `.key.json`); returns the number of answers on it."""
    todo = [r for i, r in answers().items() if i not in labelled_ids()]
    random.Random(seed).shuffle(todo)
    todo.sort(key=lambda r: r["trait"])
    key = {f"k{i:03d}": r["id"] for i, r in enumerate(todo)}
    out.write_text("".join(f"### {k} [{r['trait']}] Q: {r['question']}\nA: {r['answer']}\n\n"
                           for k, r in zip(key, todo, strict=True)))
    Path(f"{out}.key.json").write_text(json.dumps(key, indent=0))
    return len(todo)


def parse_label(line: str, where: str) -> tuple[str, dict]:
    parts = line.split(maxsplit=4)
    if len(parts) < 4 or parts[1] not in ("0", "1", "2") or parts[2] not in ("R", "-") or parts[3] not in ("I", "-"):
        raise SystemExit(f"error: {where}: expected 'KEY LEVEL R|- I|- note', got {line!r}")
    return parts[0], {"level": int(parts[1]), "refusal": parts[2] == "R", "incoherent": parts[3] == "I",
                      "note": parts[4] if len(parts) > 4 else ""}


def merge(sheet: Path, labels: Path) -> int:
    """Append the labelled rows to the set; every line is checked before anything is written."""
    key = json.loads(Path(f"{sheet}.key.json").read_text())
    rows, done = answers(), labelled_ids()
    new: dict[str, list[dict]] = {}
    for n, line in enumerate(labels.read_text().splitlines(), 1):
        if not line.strip():
            continue
        k, lab = parse_label(line, f"{labels}:{n}")
        if k not in key:
            raise SystemExit(f"error: {labels}:{n}: key {k} is not on the sheet {sheet}")
        r = rows[key[k]]
        if r["id"] in done:
            continue
        keep = ("id", "model", "condition", "alpha", "system", "question_index", "question", "answer")
        new.setdefault(r["trait"], []).append({**{f: r.get(f) for f in keep}, **lab,
                                               "split": "heldout" if r["question_index"] >= HELDOUT_FROM else "tune"})
    for trait, trows in new.items():
        with (REAL / f"{trait}.jsonl").open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in sorted(trows, key=lambda r: r["id"]))
    return sum(len(v) for v in new.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sheet")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--seed", type=int, default=1)
    m = sub.add_parser("merge")
    m.add_argument("--sheet", type=Path, required=True)
    m.add_argument("--labels", type=Path, required=True)
    args = ap.parse_args()
    if args.cmd == "sheet":
        print(f"{write_sheet(args.out, args.seed)} answers on {args.out}")
    else:
        print(f"{merge(args.sheet, args.labels)} labelled answers added to {REAL}")


if __name__ == "__main__":
    main()
