"""A short plain completion's latency while long OPRM requests run: no cap, the row cap, priority scheduling.

    .venv/bin/python -m benchmarks.admission      # about 8 minutes on 2 CPU cores

Tiny Mamba2 behind `vllm-oprm serve` on 127.0.0.1 (fp32, eager, L=2000). For each server setting: the median
latency of 20 short plain completions sent one after another with nothing else running, then the same while
four OPRM requests of 500k context tokens each (250 chunk rows apiece) run. Settings: vLLM's defaults;
`--oprm-max-inflight-rows 8`; `--scheduling-policy priority` (chunk rows one level below plain requests); both.
Prints the table and writes results/admission.json.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
CONTEXT, CHUNK, LONG_REQUESTS, PLAIN_REQUESTS = 500_000, 2000, 4, 20
SETTINGS = {
    "defaults": [],
    "--oprm-max-inflight-rows 8": ["--oprm-max-inflight-rows", "8"],
    "--scheduling-policy priority": ["--scheduling-policy", "priority"],
    "both": ["--oprm-max-inflight-rows", "8", "--scheduling-policy", "priority"],
}


async def plain_latencies(client, model: str) -> list[float]:
    latencies = []
    for number in range(PLAIN_REQUESTS):
        start = time.perf_counter()
        await client.completions.create(model=model, prompt=f"w{number} w7 w9", max_tokens=8, temperature=0.0)
        latencies.append(time.perf_counter() - start)
    return latencies


async def under_load(client, url: str, model: str, contexts: list[str]) -> tuple[list[float], float]:
    """Plain latencies measured once the long requests' rows run; how long the long ones took in all."""
    from vllm_oprm.testing import metric

    start = time.perf_counter()
    long = [
        asyncio.create_task(client.completions.create(
            model=model, prompt="w1 w2 {{context}} w3 w4", max_tokens=8, temperature=0.0,
            extra_body={"oprm": {"context": context}},
        ))
        for context in contexts
    ]
    while metric(url, "vllm:num_requests_running") < 2:
        await asyncio.sleep(0.05)  # until the four are tokenized and their rows are in the engine
    assert not any(task.done() for task in long), "the long requests finished before the measurement"
    latencies = await plain_latencies(client, model)
    await asyncio.gather(*long)
    return latencies, time.perf_counter() - start


def measure(model: str, args: list[str], contexts: list[str]) -> dict:
    import openai

    from vllm_oprm.testing import oprm_server

    server_args = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "2200", "--oprm-chunk-size", str(CHUNK), *args]
    with oprm_server(model, *server_args) as server:
        async def run():
            client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=3600)
            try:
                await plain_latencies(client, model)  # warm-up
                alone = await plain_latencies(client, model)
                loaded, long_s = await under_load(client, server.url, model, contexts)
                return alone, loaded, long_s
            finally:
                await client.close()

        alone, loaded, long_s = asyncio.run(run())
    return {"alone_median_s": statistics.median(alone), "loaded_median_s": statistics.median(loaded),
            "loaded_vs_alone": statistics.median(loaded) / statistics.median(alone), "long_requests_s": long_s}


def main() -> None:
    from vllm_oprm.testing import build_model_dir, words

    model = tempfile.mkdtemp()
    build_model_dir("mamba2", model)
    rng = torch.Generator().manual_seed(0)
    contexts = [words(rng, CONTEXT) for _ in range(LONG_REQUESTS)]
    rows = [{"setting": name, **measure(model, args, contexts)} for name, args in SETTINGS.items()]
    print(f"short plain completion, median of {PLAIN_REQUESTS}, alone and while {LONG_REQUESTS} OPRM requests of "
          f"{CONTEXT:,} tokens run:")
    print(f"{'setting':32} {'alone s':>8} {'loaded s':>9} {'ratio':>6} {'long requests s':>16}")
    for row in rows:
        print(f"{row['setting']:32} {row['alone_median_s']:8.3f} {row['loaded_median_s']:9.3f} "
              f"{row['loaded_vs_alone']:5.1f}x {row['long_requests_s']:16.1f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "admission.json"
    path.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
