"""Accuracy on LongBench v2 as its ``result.py`` computes it, from ``run.py``'s (or ``pred.py``'s) jsonl.

    python -m benchmarks.longbench_v2.score O [--compensated]

Every ``O/*.jsonl`` is one row, named by the file as ``result.py`` names them. The answer is extracted
from ``response`` with ``pred.py``'s rule; accuracy is in percent, rounded to one decimal, overall and
per bucket: easy / hard by ``difficulty``, short / medium / long by ``length``. The table goes to
stdout and ``O/result.json`` holds ``{name: {"overall": .., "easy": .., ..., "items": n}}``; an empty
bucket is None (where ``result.py`` would divide by zero).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from benchmarks.longbench.run import read_jsonl

COLUMNS = ("overall", "easy", "hard", "short", "medium", "long")
_PARENTHESIZED = re.compile(r"The correct answer is \(([A-D])\)")
_BARE = re.compile(r"The correct answer is ([A-D])")


def extract_answer(response: str) -> str | None:
    """``pred.py``'s rule: drop markdown asterisks, then "The correct answer is (X)" anywhere in the
    response, else "The correct answer is X"; case-sensitive, letters A-D only."""
    response = response.replace("*", "")
    match = _PARENTHESIZED.search(response) or _BARE.search(response)
    return match.group(1) if match else None


def accuracy(rows: list[dict], compensated: bool = False) -> dict[str, float | int | None]:
    """``result.py``'s buckets: anything not "easy" counts as hard, anything not short or medium as long.

    ``compensated`` is ``result.py``'s switch (off there): an answer that cannot be extracted scores
    1/4, a guess among four choices, instead of 0.
    """
    points = dict.fromkeys(COLUMNS, 0)
    items = dict.fromkeys(COLUMNS, 0)
    for row in rows:
        pred = extract_answer(row["response"])
        point = 0.25 if compensated and pred is None else int(pred == row["answer"])
        difficulty = "easy" if row["difficulty"] == "easy" else "hard"
        length = row["length"] if row["length"] in ("short", "medium") else "long"
        for column in ("overall", difficulty, length):
            points[column] += point
            items[column] += 1
    scores = {c: round(100 * points[c] / items[c], 1) if items[c] else None for c in COLUMNS}
    return {**scores, "items": items["overall"]}


def score_dir(pred_dir: Path, compensated: bool = False) -> dict[str, dict]:
    return {path.stem: accuracy(read_jsonl(path), compensated) for path in sorted(pred_dir.glob("*.jsonl"))}


def table(scores: dict[str, dict]) -> str:
    width = max(len("model"), *map(len, scores))
    lines = [f"{'model':<{width}}" + "".join(f"{c:>9}" for c in (*COLUMNS, "items"))]
    for name, row in scores.items():
        cells = "".join(f"{'-' if row[c] is None else f'{row[c]:.1f}':>9}" for c in COLUMNS)
        lines.append(f"{name:<{width}}{cells}{row['items']:>9}")
    return "\n".join(lines)


def main(argv=None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pred_dir", type=Path, help="the runner's --out-dir: one <run name>.jsonl per run")
    parser.add_argument("--compensated", action="store_true", help="an unextracted answer scores 1/4")
    args = parser.parse_args(argv)
    scores = score_dir(args.pred_dir, args.compensated)
    if not scores:
        raise SystemExit(f"no <run name>.jsonl predictions in {args.pred_dir}")
    print(table(scores))
    with open(args.pred_dir / "result.json", "w", encoding="utf-8") as f:
        json.dump(scores, f, ensure_ascii=False, indent=4)
    return scores


if __name__ == "__main__":
    main()
