"""Overhead of OPRM's first-token entropy capture on plain vLLM traffic.

Runs the same greedy batch (plain prompts, no OPRM) through a stock ``vllm.LLM``
and through ``OPRMLLM`` (entropy processor + worker extension loaded), then the
same prompts as single-chunk OPRM requests (entropy captured on the first step,
one collective_rpc per batch). Prints a table and writes JSON to
benchmarks/results/entropy_overhead.json.

    VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/python benchmarks/entropy_overhead.py
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-words", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch
    from vllm import LLM, SamplingParams

    from vllm_oprm import OPRMLLM, OPRMConfig, OPRMPrompt
    from vllm_oprm.testing import build_model_dir, words

    path = tempfile.mkdtemp()
    build_model_dir("mamba2", path)
    engine_args = dict(model=path, dtype="float32", enforce_eager=True, max_model_len=4096, max_num_seqs=32)
    rng = torch.Generator().manual_seed(0)
    oprm_prompts = [OPRMPrompt(words(rng, 8), words(rng, args.prompt_words), words(rng, 8)) for _ in range(args.requests)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    results = {}

    stock = LLM(**engine_args)
    tokenizer = stock.get_tokenizer()
    plain = [{"prompt_token_ids": p.tokenize(tokenizer).vanilla_ids} for p in oprm_prompts]
    results["stock vLLM, plain"] = timed(lambda: stock.generate(plain, params, use_tqdm=False), args.repeats)
    stock.llm_engine.engine_core.shutdown()

    oprm = OPRMLLM(**engine_args)
    results["OPRMLLM, plain"] = timed(lambda: oprm.generate(plain, params, use_tqdm=False), args.repeats)
    config = OPRMConfig(chunk_size=args.prompt_words + 1)
    results["OPRMLLM, single-chunk OPRM"] = timed(
        lambda: oprm.generate(oprm_prompts, params, oprm=config, use_tqdm=False), args.repeats
    )
    base = results["stock vLLM, plain"]
    print(f"\n{args.requests} requests x ({args.prompt_words + 17} prompt + {args.max_tokens} generated) tokens, tiny Mamba2, CPU")
    print(f"{'run':<28} {'seconds':>8} {'vs stock':>9}")
    for name, seconds in results.items():
        print(f"{name:<28} {seconds:>8.3f} {seconds / base:>8.3f}x")
    os.makedirs("benchmarks/results", exist_ok=True)
    with open("benchmarks/results/entropy_overhead.json", "w") as f:
        json.dump({"args": vars(args), "seconds": results, "ratio_vs_stock": {k: v / base for k, v in results.items()},
                   "date": time.strftime("%Y-%m-%d")}, f, indent=2)


if __name__ == "__main__":
    main()
