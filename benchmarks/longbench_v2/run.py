"""Zero-shot predictions on LongBench v2 through ``OPRMLLM``, resumable.

    python -m benchmarks.longbench_v2.run --data data.json --model PATH --family falcon-mamba \\
        --out-dir O [--chunk-size 2000] [--vanilla] [--limit N]

Reads LongBench v2's ``data.json`` (a JSON list; a ``.jsonl`` of the same items also works) and
appends one line per item to ``O/<run name>.jsonl`` after each batch; a rerun skips the ``_id``s
already there. OPRM reads the document in chunks and selects one, with the IDK filter off: a
multiple-choice question has no "not in this chunk" answer. ``--vanilla`` sends the same token
ids as one plain request, cut in the middle to fit ``max_model_len`` as ``pred.py`` does.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from vllm_oprm import OPRMConfig, OPRMPrompt

from benchmarks.longbench.prompts import FAMILIES, Family
from benchmarks.longbench.run import (
    add_engine_args, append_rows, chunk_choice, engine_from_args, middle_truncate, read_jsonl,
)

from .score import extract_answer

TEMPLATE = (  # LongBench v2's prompts/0shot.txt
    "Please read the following text and answer the question below.\n\n<text>\n$DOC$\n</text>\n\n"
    "What is the correct answer to this question: $Q$\nChoices:\n(A) $C_A$\n(B) $C_B$\n(C) $C_C$\n(D) $C_D$\n\n"
    'Format your response as follows: "The correct answer is (insert answer here)".'
)
FIELDS = (  # placeholder, item field, in the order pred.py fills them
    ("$Q$", "question"), ("$C_A$", "choice_A"), ("$C_B$", "choice_B"), ("$C_C$", "choice_C"), ("$C_D$", "choice_D"),
)
MAX_NEW_TOKENS = 128  # pred.py's answer length without --cot


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, type=Path, help="LongBench v2's data.json (or a .jsonl)")
    parser.add_argument("--model", required=True, help="a local model directory")
    parser.add_argument("--family", required=True, choices=sorted(FAMILIES), help="chat header, as for LongBench")
    parser.add_argument("--out-dir", required=True, type=Path)
    parser.add_argument("--chunk-size", type=int, default=2000)
    parser.add_argument("--vanilla", action="store_true", help="one plain request per item, no OPRM")
    parser.add_argument("--limit", type=int, help="first N items")
    parser.add_argument("--batch-size", type=int, default=32, help="items per generate call (and per write)")
    parser.add_argument("--run-name", help="default: <model dir>-<family>-<oprm<L>|vanilla>")
    add_engine_args(parser)
    return parser.parse_args(argv)


def read_items(path: Path) -> list[dict]:
    if path.suffix == ".json":
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    return read_jsonl(path)


def build_prompt(item: dict, family: Family, tokenizer) -> OPRMPrompt:
    """The template split at ``$DOC$``: the instruction is the prefix, the document the context, the
    question and choices the suffix, each field stripped as ``pred.py`` does. Header and BOS as the
    LongBench harness lays them out (ids, so the header is exact and BOS appears once)."""
    pre, post = TEMPLATE.split("$DOC$")
    for placeholder, field in FIELDS:
        post = post.replace(placeholder, item[field].strip())
    prefix = [*family.start, *tokenizer.encode(pre, add_special_tokens=not family.start), *family.pre_end]
    suffix = [*tokenizer.encode(post, add_special_tokens=False), *family.end]
    return OPRMPrompt(prefix, item["context"].strip(), suffix)


def run_name(args: argparse.Namespace) -> str:
    method = "vanilla" if args.vanilla else f"oprm{args.chunk_size}"
    return args.run_name or f"{Path(args.model).name}-{args.family}-{method}"


def predict(llm, items: list[dict], out_path: Path, args: argparse.Namespace) -> int:
    """Predict the items not yet in ``out_path``; returns how many were predicted."""
    from vllm import SamplingParams  # here, so the scorer's imports do not load vLLM

    done = {row["_id"] for row in read_jsonl(out_path)} if out_path.exists() else set()
    todo = [item for item in items if item["_id"] not in done]
    family = FAMILIES[args.family]
    config = None if args.vanilla else OPRMConfig(chunk_size=args.chunk_size, mode="select", idk_token_ids=())
    params = SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0.0)
    for start in range(0, len(todo), args.batch_size):
        batch = todo[start : start + args.batch_size]
        prompts = [build_prompt(item, family, llm.tokenizer) for item in batch]
        if args.vanilla:
            limit = llm.max_model_len - MAX_NEW_TOKENS
            ids = [p.tokenize(llm.tokenizer).vanilla_ids for p in prompts]
            prompts = [{"prompt_token_ids": middle_truncate(i, limit)} for i in ids]
        outs = llm.generate(prompts, params, oprm=config)
        rows = []
        for item, out in zip(batch, outs):
            response = out.outputs[0].text.strip()
            pred = extract_answer(response)
            rows.append({  # the fields pred.py writes that result.py reads, with OPRM's choice of chunk
                **{key: item[key] for key in ("_id", "domain", "sub_domain", "difficulty", "length", "answer")},
                "response": response, "pred": pred, "judge": pred == item["answer"], **chunk_choice(out),
            })
        append_rows(out_path, rows)
    return len(todo)


def main(argv=None, llm=None) -> Path:
    """Runs the items; ``llm`` (an ``OPRMLLM``) is built from the arguments unless given."""
    args = parse_args(argv)
    if not args.data.exists():  # before the engine's start-up, not after it
        raise SystemExit(f"missing data file: {args.data}")
    items = read_items(args.data)[: args.limit]
    if llm is None:
        llm = engine_from_args(args)
    os.makedirs(args.out_dir, exist_ok=True)
    out_path = args.out_dir / f"{run_name(args)}.jsonl"
    count = predict(llm, items, out_path, args)
    print(f"{count} predicted, {len(items) - count} already done; predictions in {out_path}")
    return out_path


if __name__ == "__main__":
    main()
