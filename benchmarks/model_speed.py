"""Prefill and decode speed of the plugin's model classes against vLLM's own Mamba2, matched in size.

    .venv/bin/python -m benchmarks.model_speed      # about 10 minutes on 2 CPU cores

Each family is a random model of about 2M parameters (sizes below, counted and reported), run through
vLLM's offline ``LLM`` under vLLM's default compilation settings (the plugin's classes compile like
vLLM's Mamba2). Prefill: 16 prompts of 2,000 tokens in one engine step (one OPRM batch of 2,000-token chunk
rows), one token each, in prompt tokens per second. Decode: 32 short prompts decoding together, in steps
per second (the time of 64 more tokens each, less the same prompts' prefill alone). Best of three runs
each. Prints the table with every family's ratio to Mamba2 and writes results/model_speed.json and .png.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
SIZES = {  # config fields over the tiny test configs; about 2M parameters each
    "mamba2": dict(hidden_size=256, num_heads=16, head_dim=32, state_size=64, num_hidden_layers=4, chunk_size=128),
    "rwkv6": dict(hidden_size=256, head_size=64, num_hidden_layers=2, intermediate_size=896),
    "recurrent_gemma": dict(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=3, num_attention_heads=4, head_dim=64,
        lru_width=256, attention_window_size=2048,
    ),
}
ROWS, ROW_TOKENS, DECODE_BATCH, DECODE_STEPS, REPEATS = 16, 2000, 32, 64, 3


def measure(family: str) -> dict:
    from vllm import LLM, SamplingParams

    from vllm_oprm.testing import build_model_dir

    path = tempfile.mkdtemp()
    model, tokenizer = build_model_dir(family, path, **SIZES[family])
    llm = LLM(model=path, dtype="float32", max_model_len=ROW_TOKENS + 256, max_num_seqs=DECODE_BATCH,
              max_num_batched_tokens=ROWS * ROW_TOKENS + 1024)
    g = torch.Generator().manual_seed(0)

    def prompts(count: int, length: int) -> list[dict]:
        return [{"prompt_token_ids": torch.randint(5, len(tokenizer), (length,), generator=g).tolist()} for _ in range(count)]

    def best_time(batch: list[dict], tokens: int) -> float:
        params = SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0.0)
        times = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            llm.generate(batch, params, use_tqdm=False)
            times.append(time.perf_counter() - start)
        return min(times)

    try:
        long, short = prompts(ROWS, ROW_TOKENS), prompts(DECODE_BATCH, 16)
        llm.generate(long[:2], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
        prefill_s = best_time(long, 1)
        decode_s = best_time(short, DECODE_STEPS + 1) - best_time(short, 1)
    finally:
        llm.llm_engine.engine_core.shutdown()
    return {
        "family": family, "parameters": sum(p.numel() for p in model.parameters()), "sizes": SIZES[family],
        "prefill_tokens_per_s": ROWS * ROW_TOKENS / prefill_s, "decode_steps_per_s": DECODE_STEPS / decode_s,
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    names = [row["family"] for row in rows]
    for ax, key, title in ((axes[0], "prefill_tokens_per_s", f"prefill, {ROWS} rows x {ROW_TOKENS} tokens"),
                           (axes[1], "decode_steps_per_s", f"decode, batch {DECODE_BATCH}")):
        ax.bar(names, [row[key] for row in rows])
        ax.set_title(title)
        ax.set_ylabel(key.replace("_", " "))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    rows = [measure(family) for family in SIZES]
    mamba2 = rows[0]
    for row in rows:
        row["prefill_vs_mamba2"] = row["prefill_tokens_per_s"] / mamba2["prefill_tokens_per_s"]
        row["decode_vs_mamba2"] = row["decode_steps_per_s"] / mamba2["decode_steps_per_s"]
    print(f"{'family':16} {'params':>9} {'prefill tok/s':>14} {'vs Mamba2':>9} {'decode steps/s':>15} {'vs Mamba2':>9}")
    for row in rows:
        print(f"{row['family']:16} {row['parameters']:>9,} {row['prefill_tokens_per_s']:>14,.0f} {row['prefill_vs_mamba2']:>8.2f}x "
              f"{row['decode_steps_per_s']:>15.1f} {row['decode_vs_mamba2']:>8.2f}x")
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "rows_x_tokens": [ROWS, ROW_TOKENS], "decode_batch": DECODE_BATCH}
    (RESULTS / "model_speed.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    plot(rows, RESULTS / "model_speed.png")
    print(f"wrote {RESULTS / 'model_speed.json'} and {RESULTS / 'model_speed.png'}")


if __name__ == "__main__":
    main()
