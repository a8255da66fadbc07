"""Speed and memory of OPRM vs vanilla: same server, same model, same prompts, one run.

    .venv/bin/python -m benchmarks.speed                  # tiny Mamba2 on CPU, ~10 min
    .venv/bin/python -m benchmarks.speed --family rwkv6 --contexts 2000,8000,32000 --chunk-sizes 2000 \
        --out benchmarks/results/speed_rwkv6
    .venv/bin/python -m benchmarks.speed --model DIR --server-args "--dtype bfloat16" --contexts 8000,32000

Streams every request through `vllm-oprm serve` with the `openai` client:
time to first token (first streamed text), end-to-end latency, requests per
second, with 1 request at a time and with N concurrent ones. Alongside: the
engine's peak running requests (live recurrent-state slots), prompt tokens it
prefilled (`vllm:prompt_tokens_total`) and the server's peak memory (RSS of the
launcher and every process under it). Prints the table with OPRM/vanilla ratios
and writes benchmarks/results/speed.json and speed.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

RESULTS = Path(__file__).parent / "results"


class Sampler:
    """Polls the server's process tree RSS and running requests while a measurement runs."""

    def __init__(self, server, metric):
        self.server, self.metric = server, metric
        self.peak_rss = 0
        self.peak_running = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _rss(self) -> int:
        root = psutil.Process(self.server.pid)
        total = 0
        for process in [root, *root.children(recursive=True)]:
            try:
                total += process.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, self._rss())
            self.peak_running = max(self.peak_running, self.metric(self.server.url, "vllm:num_requests_running"))
            self._stop.wait(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


async def one_request(client, model: str, prompt: str, max_tokens: int, oprm: dict | None):
    """(seconds to first text, seconds in all, text) of one streamed completion."""
    start = time.perf_counter()
    first = None
    texts = []
    extra = {"ignore_eos": True, **({"oprm": oprm} if oprm else {})}
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0, stream=True, extra_body=extra
    )
    async for event in stream:
        if event.choices and event.choices[0].text:
            texts.append(event.choices[0].text)
            if first is None:
                first = time.perf_counter() - start
    return first, time.perf_counter() - start, "".join(texts)


def measure(server, model: str, requests: list[tuple[str, dict | None]], concurrency: int, max_tokens: int) -> dict:
    """Latency, throughput, peaks and prefill of ``requests`` (``texts``: each one's answer, in order)."""
    import openai

    from vllm_oprm.testing import metric

    async def run() -> list[tuple[float, float, str]]:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=3600)
        gate = asyncio.Semaphore(concurrency)

        async def gated(prompt, oprm):
            async with gate:
                return await one_request(client, model, prompt, max_tokens, oprm)

        try:
            return await asyncio.gather(*(gated(p, o) for p, o in requests))
        finally:
            await client.close()

    prompt_tokens = metric(server.url, "vllm:prompt_tokens_total")
    with Sampler(server, metric) as sampler:
        start = time.perf_counter()
        timings = asyncio.run(run())
        wall = time.perf_counter() - start
    return {
        "ttft_s": statistics.mean(t for t, _, _ in timings),
        "latency_s": statistics.mean(total for _, total, _ in timings),
        "requests_per_s": len(requests) / wall,
        "peak_running": sampler.peak_running,
        "prefill_tokens_per_request": (metric(server.url, "vllm:prompt_tokens_total") - prompt_tokens) / len(requests),
        "peak_rss_gib": sampler.peak_rss / 2**30,
        "texts": [text for _, _, text in timings],
    }


def plot_runs(ax, rows: list[dict], value: str, label: str, title: str) -> None:
    """One line per run of ``rows[value]`` over context length, both axes logarithmic."""
    for run in dict.fromkeys(row["run"] for row in rows):
        points = [r for r in rows if r["run"] == run]
        ax.plot([r["context"] for r in points], [r[value] for r in points], marker="o", label=run)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context tokens")
    ax.set_ylabel(label)
    ax.set_title(title)
    ax.legend()


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    concurrencies = sorted({row["concurrency"] for row in rows})
    fig, axes = plt.subplots(1, len(concurrencies), figsize=(5 * len(concurrencies), 4), squeeze=False)
    for ax, concurrency in zip(axes[0], concurrencies):
        plot_runs(ax, [r for r in rows if r["concurrency"] == concurrency], "latency_s",
                  "end-to-end seconds per request", f"{concurrency} concurrent request(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", help="model directory (default: a tiny random model of --family built here)")
    parser.add_argument("--family", default="mamba2", help="tiny model family when no --model: mamba2, rwkv6, recurrent_gemma, ...")
    parser.add_argument("--server-args", default="--dtype float32 --enforce-eager", help="extra vllm serve args")
    parser.add_argument("--contexts", default="2000,8000,32000,128000")
    parser.add_argument("--chunk-sizes", default="1000,2000,3000")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--concurrent-up-to", type=int, default=32000, help="largest context run concurrently")
    parser.add_argument("--sequential-requests", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from vllm_oprm.testing import build_model_dir, oprm_server, words

    contexts = [int(c) for c in args.contexts.split(",")]
    chunk_sizes = [int(c) for c in args.chunk_sizes.split(",")]
    model = args.model or tempfile.mkdtemp()
    if not args.model:
        build_model_dir(args.family, model)
    server_args = [
        *shlex.split(args.server_args), "--max-model-len", str(max(contexts) + 256), "--max-num-seqs", "256",
    ]
    runs = [("vanilla", None)] + [(f"oprm L={size}", size) for size in chunk_sizes]
    rows = []
    with oprm_server(model, *server_args) as server:
        rng = torch.Generator().manual_seed(0)
        measure(server, model, [("w1 w2", None)], 1, args.max_tokens)  # warm-up
        for context_tokens in contexts:
            context = words(rng, context_tokens)
            prefix, question = words(rng, 20), words(rng, 12)
            for concurrency in [1, args.concurrency]:
                if concurrency > 1 and context_tokens > args.concurrent_up_to:
                    continue
                count = args.sequential_requests if concurrency == 1 else concurrency
                for run, chunk_size in runs:
                    if chunk_size is None:
                        request = (f"{prefix} {context} {question}", None)
                    else:
                        request = (f"{prefix} {{{{context}}}} {question}", {"context": context, "chunk_size": chunk_size})
                    result = measure(server, model, [request] * count, concurrency, args.max_tokens)
                    del result["texts"]
                    rows.append({"context": context_tokens, "concurrency": concurrency, "run": run, **result})
                    print(f"{context_tokens:>7} x{concurrency:<3} {run:<12} latency {result['latency_s']:.2f} s", flush=True)

    for row in rows:
        base = next(
            r for r in rows if r["run"] == "vanilla" and (r["context"], r["concurrency"]) == (row["context"], row["concurrency"])
        )
        row["latency_vs_vanilla"] = row["latency_s"] / base["latency_s"]
        row["ttft_vs_vanilla"] = row["ttft_s"] / base["ttft_s"]
    columns = [
        ("context", "{:>7}"), ("concurrency", "{:>4}"), ("run", "{:<12}"), ("ttft_s", "{:>7.3f}"),
        ("latency_s", "{:>8.3f}"), ("latency_vs_vanilla", "{:>6.2f}x"), ("ttft_vs_vanilla", "{:>6.2f}x"),
        ("requests_per_s", "{:>7.2f}"), ("peak_running", "{:>5.0f}"), ("prefill_tokens_per_request", "{:>9.0f}"),
        ("peak_rss_gib", "{:>6.2f}"),
    ]
    print("\n" + " | ".join(name for name, _ in columns))
    for row in rows:
        print(" | ".join(fmt.format(row[name]) for name, fmt in columns))
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "model": args.model or f"tiny random {args.family}", "args": vars(args) | {"out": str(args.out)}}
    (args.out / "speed.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    plot(rows, args.out / "speed.png")
    print(f"wrote {args.out / 'speed.json'} and {args.out / 'speed.png'}")


if __name__ == "__main__":
    main()
