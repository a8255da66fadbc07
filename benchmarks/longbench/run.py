"""Predictions on LongBench / LongBench-E through ``OPRMLLM``, resumable.

    python -m benchmarks.longbench.run --data-dir D --model PATH --family falcon-mamba \\
        --out-dir O [--datasets hotpotqa,qasper] [--e] [--chunk-size 2000] [--vanilla] [--limit N]

Reads ``D/<dataset>.jsonl`` (``D/<dataset>_e.jsonl`` with ``--e``) and appends one line per item
to ``O/<run name>/<dataset>.jsonl`` after each batch; a rerun skips the ``_id``s already there.
``--vanilla`` sends the same token ids as one plain request per item, cut in the middle to fit
``max_model_len`` as LongBench's ``pred.py`` does.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from vllm_oprm import OPRMConfig

from .prompts import DATASETS, DATASETS_E, FAMILIES, MAX_NEW_TOKENS, build_prompt, idk_token_ids, mode


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--model", required=True, help="a local model directory")
    parser.add_argument("--family", required=True, choices=sorted(FAMILIES))
    parser.add_argument("--out-dir", required=True, type=Path)
    parser.add_argument("--datasets", help="comma-separated; default: every English task of the benchmark")
    parser.add_argument("--e", action="store_true", help="LongBench-E (<dataset>_e.jsonl)")
    parser.add_argument("--chunk-size", type=int, default=2000)
    parser.add_argument("--vanilla", action="store_true", help="one plain request per item, no OPRM")
    parser.add_argument("--limit", type=int, help="first N items of each dataset")
    parser.add_argument("--batch-size", type=int, default=32, help="items per generate call (and per write)")
    parser.add_argument("--run-name", help="default: <model dir>-<family>-<oprm<L>|vanilla>[-e]")
    add_engine_args(parser)
    args = parser.parse_args(argv)
    args.datasets = args.datasets.split(",") if args.datasets else list(DATASETS_E if args.e else DATASETS)
    unknown = [d for d in args.datasets if d not in DATASETS]
    if unknown:
        parser.error(f"unknown datasets {unknown}; choose from {', '.join(DATASETS)}")
    return args


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def middle_truncate(ids: list[int], limit: int) -> list[int]:
    """LongBench's cut: keep the first and last ``limit // 2`` tokens, where the instructions are."""
    if len(ids) <= limit:
        return ids
    half = limit // 2
    return ids[:half] + ids[len(ids) - half :]


def run_name(args: argparse.Namespace) -> str:
    method = "vanilla" if args.vanilla else f"oprm{args.chunk_size}"
    return args.run_name or f"{Path(args.model).name}-{args.family}-{method}{'-e' if args.e else ''}"


def run_dataset(llm, dataset: str, items: list[dict], out_path: Path, args: argparse.Namespace) -> int:
    """Predict the items not yet in ``out_path``; returns how many were predicted."""
    from vllm import SamplingParams  # here, so the scorer can use this module without loading vLLM

    done = {row["_id"] for row in read_jsonl(out_path)} if out_path.exists() else set()
    todo = [item for item in items if item["_id"] not in done]
    family = FAMILIES[args.family]
    idk = () if args.vanilla else idk_token_ids(family, llm.tokenizer)
    config = None if args.vanilla else OPRMConfig(chunk_size=args.chunk_size, mode=mode(dataset), idk_token_ids=idk)
    params = SamplingParams(max_tokens=MAX_NEW_TOKENS[dataset], temperature=0.0)
    for start in range(0, len(todo), args.batch_size):
        batch = todo[start : start + args.batch_size]
        # The IDK variant of a prompt goes with the IDK filter, as the authors ran it.
        prompts = [build_prompt(dataset, item, family, llm.tokenizer, idk=bool(idk)) for item in batch]
        if args.vanilla:
            limit = llm.max_model_len - params.max_tokens
            ids = [p.tokenize(llm.tokenizer).vanilla_ids for p in prompts]
            prompts = [{"prompt_token_ids": middle_truncate(i, limit)} for i in ids]
        outs = llm.generate(prompts, params, oprm=config)
        append_rows(out_path, [
            {
                "_id": item["_id"], "pred": out.outputs[0].text, "answers": item["answers"],
                "all_classes": item["all_classes"], "length": item["length"], **chunk_choice(out),
            }
            for item, out in zip(batch, outs)
        ])
    return len(todo)


def chunk_choice(out) -> dict:
    """OPRM's split and choice for a prediction row (None for a vanilla request)."""
    return {
        "num_chunks": None if out.oprm is None else out.oprm.num_chunks,
        "selected_chunk": None if out.oprm is None else out.oprm.selected_chunk,
    }


def append_rows(path: Path, rows: list[dict]) -> None:
    """One batch's rows, appended at once: a run stopped mid-way resumes from the last whole batch."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """The engine flags ``engine_from_args`` reads."""
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--max-num-seqs", type=int)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--trust-remote-code", action="store_true", help="RWKV6's tokenizer needs it")


def engine_from_args(args: argparse.Namespace):
    """The ``OPRMLLM`` the engine flags describe (unset flags keep vLLM's defaults)."""
    from vllm_oprm import OPRMLLM

    engine_args = dict(
        model=args.model, dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        enforce_eager=args.enforce_eager, trust_remote_code=args.trust_remote_code,
    )
    return OPRMLLM(**{k: v for k, v in engine_args.items() if v is not None})


def main(argv=None, llm=None) -> Path:
    """Runs every dataset; ``llm`` (an ``OPRMLLM``) is built from the arguments unless given."""
    args = parse_args(argv)
    suffix = "_e" if args.e else ""
    paths = {d: args.data_dir / f"{d}{suffix}.jsonl" for d in args.datasets}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:  # before the engine's start-up, not after it
        raise SystemExit(f"missing data files: {', '.join(missing)}")
    if llm is None:
        llm = engine_from_args(args)
    run_dir = args.out_dir / run_name(args)
    os.makedirs(run_dir, exist_ok=True)
    for dataset, path in paths.items():
        items = read_jsonl(path)[: args.limit]
        count = run_dataset(llm, dataset, items, run_dir / f"{dataset}.jsonl", args)
        print(f"{dataset}: {count} predicted, {len(items) - count} already done")
    print(f"predictions in {run_dir}")
    return run_dir


if __name__ == "__main__":
    main()
