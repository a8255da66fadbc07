"""Opt-in early exit (``early_exit_entropy``) on the shipped associative-recall Mamba2: how much
of the context it reads, what that costs in accuracy, and what it saves end to end.

    .venv/bin/python -m benchmarks.early_exit      # ~21 min on 2 cores; needs VLLM_CPU_KVCACHE_SPACE

1. Sweep (offline ``OPRMLLM``): contexts of 64..512 key-value pairs (4..32 chunks of T=16
   pairs), one question each about a present key, IDK filter on ("Error"); accuracy and prefill
   tokens per question for each threshold (off = the paper's rule) with batches of 1, 4 and 16
   chunks.
2. Pick: at the largest context, per batch size, the threshold with the fewest prefill tokens
   whose accuracy is within 0.02 of off.
3. Latency through ``vllm-oprm serve`` (streamed, one request at a time): contexts of 32k and
   128k tokens made of T-pair chunks with the asked key once (``long_recall_items``); vanilla,
   OPRM, and OPRM with early exit at the picked threshold, same server, same questions.

Writes benchmarks/results/early_exit.json and early_exit.png and prints both tables.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

from .ar.evaluate import CHECKPOINT, load_engine, training_pairs  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MAX_ACCURACY_LOSS = 0.02


def floats(text: str) -> list[float]:
    return [float(value) for value in text.split(",")]


def integers(text: str) -> list[int]:
    return [int(value) for value in text.split(",")]


def row_tokens(tokenizer, prompt, chunk_size: int) -> int:
    """Tokens of one chunk row ``[P, C_i, S]`` (every row of these prompts has the same length)."""
    from vllm_oprm import OPRMConfig
    from vllm_oprm.core import build_rows

    return len(build_rows(prompt.tokenize(tokenizer), OPRMConfig(chunk_size=chunk_size)).rows[0])


def sweep(llm, t: int, pairs_list, batch_chunks, thresholds, items: int) -> list[dict]:
    """Accuracy and prefill per question for every (context, batch size, threshold); None = off."""
    from vllm import SamplingParams

    from vllm_oprm import OPRMConfig, OPRMPrompt

    from .ar.task import IDK_WORD, recall_items

    params = SamplingParams(max_tokens=1, temperature=0.0)
    idk = tuple(llm.tokenizer.encode(IDK_WORD, add_special_tokens=False))
    rows = []
    for pairs in pairs_list:
        questions = recall_items(seed=pairs, count=items, pairs=pairs)
        prompts = [OPRMPrompt("", q.context, q.query) for q in questions]
        row = row_tokens(llm.tokenizer, prompts[0], 2 * t)
        for batch in batch_chunks:
            for threshold in [None, *thresholds]:
                config = OPRMConfig(
                    chunk_size=2 * t, idk_token_ids=idk, max_batch_tokens=batch * row, early_exit_entropy=threshold
                )
                start = time.perf_counter()
                outs = llm.generate(prompts, params, oprm=config, use_tqdm=False)
                seconds = time.perf_counter() - start
                rows.append({
                    "pairs": pairs, "chunks": outs[0].oprm.num_chunks, "batch_chunks": batch, "threshold": threshold,
                    "accuracy": statistics.mean(o.outputs[0].text.strip() == q.answer for o, q in zip(outs, questions)),
                    "prefill_tokens": statistics.mean(o.oprm.prefill_tokens for o in outs),
                    "chunks_read": statistics.mean(o.oprm.chunks_read for o in outs),
                    "stopped_early": statistics.mean(o.oprm.stopped_early for o in outs),
                    "seconds": seconds,
                })
                print(f"{pairs:>4} pairs, batches of {batch:>2}, threshold {threshold}: "
                      f"accuracy {rows[-1]['accuracy']:.3f}, {rows[-1]['chunks_read']:.1f} chunks read", flush=True)
    for row in rows:
        off = next(r for r in rows if (r["pairs"], r["batch_chunks"], r["threshold"]) == (row["pairs"], row["batch_chunks"], None))
        row["accuracy_vs_off"] = row["accuracy"] - off["accuracy"]
        row["tokens_vs_off"] = row["prefill_tokens"] / off["prefill_tokens"]
    return rows


def pick(rows: list[dict], pairs: int) -> dict[int, dict]:
    """Per batch size at ``pairs``: the threshold with the fewest tokens within MAX_ACCURACY_LOSS of off."""
    picked = {}
    for batch in sorted({r["batch_chunks"] for r in rows}):
        allowed = [r for r in rows if r["pairs"] == pairs and r["batch_chunks"] == batch
                   and r["accuracy_vs_off"] >= -MAX_ACCURACY_LOSS]
        picked[batch] = min(allowed, key=lambda r: (r["prefill_tokens"], -r["accuracy"]))
    return picked


def latency(checkpoint: Path, t: int, contexts, threshold: float, batch_chunks, questions: int) -> list[dict]:
    """Streamed end-to-end latency through one server: vanilla, OPRM, OPRM with early exit."""
    from vllm_oprm import OPRMPrompt
    from vllm_oprm.testing import oprm_server

    from .ar.task import IDK_WORD, long_recall_items
    from .speed import measure

    model = str(checkpoint)
    chunk_size = 2 * t
    server_args = [
        "--dtype", "float32", "--enforce-eager", "--max-model-len", str(max(contexts) + 64), "--max-num-seqs", "256",
        "--oprm-chunk-size", str(chunk_size), "--oprm-idk", IDK_WORD,
        "--oprm-max-chunks", str(max(contexts) // chunk_size + 1),
    ]
    rows = []
    with oprm_server(model, *server_args) as server:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model)
        measure(server, model, [("w1 w2", None)], 1, 1)  # warm-up
        for tokens in contexts:
            items = long_recall_items(seed=tokens, count=questions, pairs=tokens // 2, pairs_per_chunk=t)
            row = row_tokens(tokenizer, OPRMPrompt("", items[0].context, items[0].query), chunk_size)
            runs = {"vanilla": [(f"{item.context} {item.query}", None) for item in items]}
            runs["oprm"] = [(f"{{{{context}}}} {item.query}", {"context": item.context}) for item in items]
            for batch in batch_chunks:
                early = {"early_exit_entropy": threshold, "max_batch_tokens": batch * row}
                runs[f"early exit, {batch}-chunk batches"] = [(p, {**o, **early}) for p, o in runs["oprm"]]
            key_at = statistics.mean(item.pair_index / (tokens // 2) for item in items)
            for run, requests in runs.items():
                result = measure(server, model, requests, 1, 1)
                texts = result.pop("texts")
                accuracy = statistics.mean(text.strip() == item.answer for text, item in zip(texts, items))
                rows.append({"context": tokens, "run": run, "accuracy": accuracy, "key_at": key_at, **result})
                print(f"{tokens:>7} tokens, {run:<28} latency {result['latency_s']:.3f} s, accuracy {accuracy:.2f}", flush=True)
    for row in rows:
        base = next(r for r in rows if r["run"] == "vanilla" and r["context"] == row["context"])
        row["latency_vs_vanilla"] = row["latency_s"] / base["latency_s"]
        row["prefill_vs_vanilla"] = row["prefill_tokens_per_request"] / base["prefill_tokens_per_request"]
    return rows


def plot(rows: list[dict], pairs: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (tokens_ax, accuracy_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for batch in sorted({r["batch_chunks"] for r in rows}):
        points = [r for r in rows if r["pairs"] == pairs and r["batch_chunks"] == batch and r["threshold"] is not None]
        thresholds = [r["threshold"] for r in points]
        tokens_ax.plot(thresholds, [r["tokens_vs_off"] for r in points], marker="o", label=f"batches of {batch}")
        accuracy_ax.plot(thresholds, [r["accuracy"] for r in points], marker="o", label=f"batches of {batch}")
    off = [r["accuracy"] for r in rows if r["pairs"] == pairs and r["threshold"] is None]
    accuracy_ax.axhline(statistics.mean(off), color="gray", linestyle=":", label="off (full OPRM)")
    for ax in (tokens_ax, accuracy_ax):
        ax.set_xscale("log")
        ax.set_xlabel("early_exit_entropy (nats)")
        ax.legend()
    tokens_ax.set_ylabel("prefill tokens per question (x full OPRM)")
    accuracy_ax.set_ylabel("accuracy")
    fig.suptitle(f"Early exit, associative recall, {pairs} pairs, tiny Mamba2 through vLLM")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    parser.add_argument("--pairs", type=integers, default=[64, 128, 256, 512])
    parser.add_argument("--batch-chunks", type=integers, default=[1, 4, 16])
    parser.add_argument("--thresholds", type=floats, default=[0.1, 0.3, 0.5, 0.6, 0.7, 0.8, 1.0, 2.0])
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--contexts", type=integers, default=[32_000, 128_000])
    parser.add_argument("--latency-batch-chunks", type=integers, default=[16, 128],
                        help="batch sizes of the latency runs (1-chunk batches at 128k would be 4000 sequential rounds)")
    parser.add_argument("--questions", type=int, default=16, help="questions per context length in the latency runs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    t = training_pairs(args.checkpoint)
    llm = load_engine(args.checkpoint, max(args.pairs))
    rows = sweep(llm, t, args.pairs, args.batch_chunks, args.thresholds, args.items)
    llm.llm.llm_engine.engine_core.shutdown()
    largest = max(args.pairs)
    picked = pick(rows, largest)
    threshold = picked[min(picked)]["threshold"]  # the smallest batches read the least

    columns = [("pairs", "{:>5}"), ("batch_chunks", "{:>5}"), ("threshold", "{!s:>6}"), ("accuracy", "{:>6.3f}"),
               ("accuracy_vs_off", "{:>+7.3f}"), ("chunks_read", "{:>6.1f}"), ("prefill_tokens", "{:>8.0f}"),
               ("tokens_vs_off", "{:>5.2f}x"), ("stopped_early", "{:>5.2f}"), ("seconds", "{:>6.2f}")]
    print(f"\nSweep: {args.items} questions per point, T = {t} pairs per chunk")
    print(" | ".join(name for name, _ in columns))
    for row in rows:
        print(" | ".join(fmt.format(row[name]) for name, fmt in columns))
    for batch, row in picked.items():
        print(f"picked at {largest} pairs, batches of {batch}: threshold {row['threshold']}, accuracy "
              f"{row['accuracy']:.3f} ({row['accuracy_vs_off']:+.3f} vs off), {row['tokens_vs_off']:.2f}x off's tokens")

    latency_rows = []
    if threshold is not None and args.contexts:
        latency_rows = latency(args.checkpoint, t, args.contexts, threshold, args.latency_batch_chunks, args.questions)
        columns = [("context", "{:>7}"), ("run", "{:<29}"), ("latency_s", "{:>7.3f}"), ("latency_vs_vanilla", "{:>5.2f}x"),
                   ("ttft_s", "{:>7.3f}"), ("prefill_tokens_per_request", "{:>8.0f}"), ("prefill_vs_vanilla", "{:>5.2f}x"),
                   ("accuracy", "{:>5.2f}"), ("key_at", "{:>5.2f}")]
        print(f"\nLatency through the server, threshold {threshold}, {args.questions} questions one at a time "
              "(key_at: mean position of the asked key, as a fraction of the context)")
        print(" | ".join(name for name, _ in columns))
        for row in latency_rows:
            print(" | ".join(fmt.format(row[name]) for name, fmt in columns))

    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "T": t, "args": {k: str(v) for k, v in vars(args).items()}}
    result = {**meta, "sweep": rows, "picked": {str(b): r for b, r in picked.items()}, "threshold": threshold,
              "latency": latency_rows}
    (args.out / "early_exit.json").write_text(json.dumps(result, indent=1))
    plot(rows, largest, args.out / "early_exit.png")
    print(f"wrote {args.out / 'early_exit.json'} and {args.out / 'early_exit.png'}")


if __name__ == "__main__":
    main()
