"""OPRM vs vanilla through vLLM on a tiny local Mamba2, printed as a short table.

``python -m vllm_oprm.demo`` (or ``make demo``). The model is built locally with
random weights, so the answers are tokens, not words: the demo shows the
mechanics (chunks, selection, time) through the real engine, not quality.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # keep the table readable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="mamba2")
    parser.add_argument("--context-words", type=int, default=6000)
    parser.add_argument("--chunk-size", type=int, default=1000)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()

    from vllm import SamplingParams

    from . import OPRMLLM, OPRMConfig, OPRMPrompt
    from .testing import build_model_dir, words

    with tempfile.TemporaryDirectory() as path:
        build_model_dir(args.family, path)
        llm = OPRMLLM(model=path, dtype="float32", enforce_eager=True, max_model_len=args.context_words + 64)
        rng = torch.Generator().manual_seed(0)
        prompt = OPRMPrompt(words(rng, 12), words(rng, args.context_words), words(rng, 8))
        params = SamplingParams(max_tokens=args.max_new_tokens, temperature=0.0)
        tokens = prompt.tokenize(llm.tokenizer)
        vanilla_prompt = {"prompt_token_ids": tokens.vanilla_ids}
        runs = []
        for name, request, config in [
            ("vanilla", vanilla_prompt, None),
            ("oprm select", prompt, OPRMConfig(chunk_size=args.chunk_size)),
        ]:
            start = time.perf_counter()
            out = llm.generate([request], params, oprm=config, use_tqdm=False)[0]
            runs.append((name, out, time.perf_counter() - start))
    context = len(tokens.context_ids)
    print(f"\n{args.family} through vLLM, {context}-token context, chunk size {args.chunk_size}")
    print(f"{'run':<12} {'chunks':>6} {'selected':>8} {'seconds':>8}  answer")
    for name, out, seconds in runs:
        chunks, selected = (1, "-") if out.oprm is None else (out.oprm.num_chunks, out.oprm.selected_chunk)
        print(f"{name:<12} {chunks:>6} {selected!s:>8} {seconds:>8.2f}  {out.outputs[0].text.strip()}")


if __name__ == "__main__":
    main()
