"""Scores a run directory of ``run.py`` (or of LongBench's ``pred.py``) with LongBench's metrics.

    python -m benchmarks.longbench.score O/<run name> [--e]

Every ``<dataset>.jsonl`` in the directory is scored; the table goes to stdout and
``result.json`` is written next to the predictions in LongBench's ``eval.py`` format:
``{dataset: score}``, or ``{dataset: {"0-4k": .., "4-8k": .., "8k+": ..}}`` with ``--e``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .metrics import BUCKETS, score_by_length, score_dataset
from .run import read_jsonl


def score_run(run_dir: Path, e: bool) -> dict:
    score = score_by_length if e else score_dataset
    return {path.stem: score(path.stem, read_jsonl(path)) for path in sorted(run_dir.glob("*.jsonl"))}


def average(scores: dict, e: bool) -> float | dict[str, float | None]:
    """The mean over datasets (per bucket for LongBench-E), the paper's headline number."""

    def mean(values):
        values = [v for v in values if v is not None]
        return round(sum(values) / len(values), 2) if values else None

    if e:
        return {bucket: mean(s[bucket] for s in scores.values()) for bucket in BUCKETS}
    return mean(scores.values())


def table(scores: dict, e: bool) -> str:
    columns = BUCKETS if e else ("score",)
    rows = {**scores, "average": average(scores, e)}
    width = max(len(name) for name in rows)
    lines = [f"{'dataset':<{width}}" + "".join(f"{c:>9}" for c in columns)]
    for name, value in rows.items():
        values = [value[c] for c in columns] if e else [value]
        lines.append(f"{name:<{width}}" + "".join(f"{'-' if v is None else f'{v:.2f}':>9}" for v in values))
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--e", action="store_true", help="LongBench-E: score by length bucket")
    args = parser.parse_args(argv)
    scores = score_run(args.run_dir, args.e)
    if not scores:
        raise SystemExit(f"no <dataset>.jsonl predictions in {args.run_dir}")
    print(table(scores, args.e))
    with open(args.run_dir / "result.json", "w", encoding="utf-8") as f:
        json.dump(scores, f, ensure_ascii=False, indent=4)
    return scores


if __name__ == "__main__":
    main()
