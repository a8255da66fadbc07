"""OPRM vs vanilla on a tiny local Mamba2, printed as a short table.

``python -m vllm_oprm.demo`` (or ``make demo``). The model is built locally with
random weights, so the answers are tokens, not words: the demo shows the
mechanics (chunks, selection, time), not quality.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from . import OPRMConfig, OPRMPrompt
from .reference import OPRMGenerator
from .testing import build_model_dir, words


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="mamba2")
    parser.add_argument("--context-words", type=int, default=6000)
    parser.add_argument("--chunk-size", type=int, default=1000)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as path:
        model, tokenizer = build_model_dir(args.family, path)
        rng = torch.Generator().manual_seed(0)
        prompt = OPRMPrompt(words(rng, 12), words(rng, args.context_words), words(rng, 8))
        generator = OPRMGenerator(model, tokenizer)
        rows = []
        for name, config in [
            ("vanilla", OPRMConfig(chunk_size=10**9)),
            ("oprm select", OPRMConfig(chunk_size=args.chunk_size)),
        ]:
            start = time.perf_counter()
            out = generator.generate(prompt, config, max_new_tokens=args.max_new_tokens)
            rows.append((name, out, time.perf_counter() - start))
    print(f"\n{args.family}, {args.context_words}-token context, chunk size {args.chunk_size} (reference backend)")
    print(f"{'run':<12} {'chunks':>6} {'selected':>8} {'seconds':>8}  answer")
    for name, out, seconds in rows:
        print(f"{name:<12} {out.num_chunks:>6} {out.selected_chunk!s:>8} {seconds:>8.2f}  {out.text}")


if __name__ == "__main__":
    main()
