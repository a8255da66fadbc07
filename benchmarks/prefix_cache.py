"""Many questions on one long document: OPRM with vLLM's prefix cache of chunk states vs without.

    .venv/bin/python -m benchmarks.prefix_cache             # tiny Mamba2 on CPU, ~6 min
    .venv/bin/python -m benchmarks.prefix_cache --family falcon_mamba --out benchmarks/results/prefix_cache_falcon_mamba
    (the same for rwkv6 and recurrent_gemma, into prefix_cache_<family>)
    .venv/bin/python -m benchmarks.prefix_cache --model DIR --server-args "--dtype bfloat16" --contexts 32000

Two `vllm-oprm serve` runs on the same model: one with `--oprm-prefix-cache true`
(vLLM's `--enable-prefix-caching`, block-aligned chunk rows), one without (the
same aligned chunk size, so both lay out the same rows). For every document the
cached server answers a first question (cold: nothing cached yet) and then
further questions (warm), each streamed with the `openai` client, one at a
time; the uncached server answers the same questions. Reported per request:
time to first token, the prefill tokens OPRM sent and how many came from the
cache (the response's `oprm.prefill_tokens`), and whether the answer equals the
uncached one (greedy). Prints the table and writes
benchmarks/results/prefix_cache.json and prefix_cache.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import tempfile
import time
from pathlib import Path

import torch

from .speed import RESULTS, plot_runs


async def ask(client, model: str, prefix: str, context: str, question: str, oprm: dict, max_tokens: int) -> dict:
    """One streamed OPRM completion: its time to first token, text and ``oprm`` metadata."""
    start = time.perf_counter()
    first, text, meta = None, "", None
    stream = await client.completions.create(
        model=model, prompt=f"{prefix} {{{{context}}}} {question}", max_tokens=max_tokens, temperature=0.0,
        stream=True, extra_body={"ignore_eos": True, "oprm": {"context": context, **oprm}},
    )
    async for event in stream:
        if event.choices and event.choices[0].text:
            first = first or time.perf_counter() - start
            text += event.choices[0].text
        meta = (event.model_extra or {}).get("oprm", meta)
    return {"ttft_s": first, "text": text, **meta["prefill_tokens"], "num_chunks": meta["num_chunks"]}


def run_server(model: str, server_args: list[str], documents, oprm: dict, max_tokens: int) -> list[list[dict]]:
    """Per document, the answers to its questions in order, from one fresh server."""
    import openai

    from vllm_oprm.testing import oprm_server

    async def questions(url: str) -> list[list[dict]]:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)
        try:
            await ask(client, model, "w1", "w2 w3", "w4", {}, 2)  # warm the server up, outside the measurement
            return [
                [await ask(client, model, prefix, context, q, oprm, max_tokens) for q in qs]
                for prefix, context, qs in documents
            ]
        finally:
            await client.close()

    with oprm_server(model, *server_args) as server:
        return asyncio.run(questions(server.url))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    plot_runs(ax, rows, "ttft_s", "time to first token, s", "OPRM questions on one document")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", help="model directory (default: a tiny random model of --family built here)")
    parser.add_argument("--family", default="mamba2", help="the tiny model's family (vllm_oprm.testing.FAMILIES)")
    parser.add_argument("--server-args", default="--dtype float32 --enforce-eager", help="extra vllm serve args")
    parser.add_argument("--contexts", default="32000,128000")
    parser.add_argument("--chunk-size", type=int, default=2000)
    parser.add_argument("--block-size", type=int, default=64, help="vLLM's --block-size: where states are cached")
    parser.add_argument("--documents", type=int, default=2, help="documents per context length")
    parser.add_argument("--questions", type=int, default=4, help="questions per document; the first is cold")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from vllm_oprm.core import aligned_chunk_size
    from vllm_oprm.testing import build_model_dir, words

    contexts = [int(c) for c in args.contexts.split(",")]
    model = args.model or tempfile.mkdtemp()
    if not args.model:
        build_model_dir(args.family, model)
    rng = torch.Generator().manual_seed(0)
    prefix = words(rng, 20)
    documents, lengths = [], []
    for context_tokens in contexts:
        for _ in range(args.documents):
            qs = [words(rng, 12) for _ in range(args.questions)]
            documents.append((prefix, words(rng, context_tokens), qs))
            lengths.append(context_tokens)
    # The tiny model's tokenizer gives one token per word, plus BOS on the prefix.
    aligned = aligned_chunk_size(len(prefix.split()) + 1, args.chunk_size, args.block_size)
    base = [*shlex.split(args.server_args), "--max-model-len", str(aligned + 512), "--max-num-seqs", "256"]
    cached_args = [*base, "--block-size", str(args.block_size), "--oprm-prefix-cache", "true"]
    cached = run_server(model, cached_args, documents, {"chunk_size": args.chunk_size}, args.max_tokens)
    # vLLM turns prefix caching on by default for hybrids (RecurrentGemma): the baseline turns it off
    uncached = run_server(model, [*base, "--no-enable-prefix-caching"], documents, {"chunk_size": aligned}, args.max_tokens)

    rows = []
    for context_tokens, with_cache, without in zip(lengths, cached, uncached):
        for question, (hit, miss) in enumerate(zip(with_cache, without)):
            kind = "cold" if question == 0 else "warm"
            rows.append({"context": context_tokens, "run": f"cache, {kind}", "same_answer": hit["text"] == miss["text"],
                         **{k: v for k, v in hit.items() if k != "text"}})
            rows.append({"context": context_tokens, "run": "no cache", **{k: v for k, v in miss.items() if k != "text"}})
    summary = []
    for context_tokens in contexts:
        for run in ("no cache", "cache, cold", "cache, warm"):
            points = [r for r in rows if r["context"] == context_tokens and r["run"] == run]
            summary.append({
                "context": context_tokens, "run": run, "requests": len(points),
                "ttft_s": statistics.mean(r["ttft_s"] for r in points),
                "prefill_tokens": statistics.mean(r["total"] for r in points),
                "computed_tokens": statistics.mean(r["computed"] for r in points),
                "cached_tokens": statistics.mean(r["cached"] for r in points),
                "same_answer": all(r.get("same_answer", True) for r in points),
            })
        cold, warm = (s for s in summary[-2:])
        warm["warm_vs_cold"] = warm["ttft_s"] / cold["ttft_s"]
        cold["cold_vs_no_cache"] = cold["ttft_s"] / summary[-3]["ttft_s"]

    columns = [("context", "{:>7}"), ("run", "{:<12}"), ("requests", "{:>3}"), ("ttft_s", "{:>7.3f}"),
               ("prefill_tokens", "{:>8.0f}"), ("computed_tokens", "{:>8.0f}"), ("cached_tokens", "{:>8.0f}"),
               ("same_answer", "{!s:>5}")]
    print("\n" + " | ".join(name for name, _ in columns) + " | ratio")
    for row in summary:
        ratio = ""
        if "warm_vs_cold" in row:
            ratio = f"warm/cold TTFT {row['warm_vs_cold']:.3f}x"
        elif "cold_vs_no_cache" in row:
            ratio = f"cold/no-cache TTFT {row['cold_vs_no_cache']:.2f}x"
        print(" | ".join(fmt.format(row[name]) for name, fmt in columns) + " | " + ratio)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "model": args.model or f"tiny random {args.family}", "aligned_chunk_size": aligned,
            "args": vars(args) | {"out": str(args.out)}}
    (args.out / "prefix_cache.json").write_text(json.dumps({**meta, "summary": summary, "requests": rows}, indent=1))
    plot(summary, args.out / "prefix_cache.png")
    print(f"wrote {args.out / 'prefix_cache.json'} and {args.out / 'prefix_cache.png'}")


if __name__ == "__main__":
    main()
