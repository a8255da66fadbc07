"""Associative recall through vLLM: vanilla vs OPRM (with and without the IDK filter) vs the oracle chunk.

    .venv/bin/python -m benchmarks.ar.evaluate      # ~2 min on 2 cores; needs VLLM_CPU_KVCACHE_SPACE

Contexts hold 1x..32x T key-value pairs (T: the most the model saw in training)
and one question about a present key. OPRM chunks are T pairs (2T tokens), so
the key lives in chunk ``pair_index // T``: the oracle run decodes from that
chunk alone. Writes benchmarks/results/ar.json and ar.png and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

CHECKPOINT = Path(__file__).parent / "checkpoint"
RESULTS = Path(__file__).parents[1] / "results"
RUNS = ("vanilla", "oprm + idk filter", "oprm, no filter", "oracle chunk")


def training_pairs(checkpoint: Path) -> int:
    return json.loads((checkpoint / "training.json").read_text())["args"]["max_pairs"]


def load_engine(checkpoint: Path, max_pairs: int, **engine_kwargs):
    from vllm_oprm import OPRMLLM

    return OPRMLLM(
        model=str(checkpoint), dtype="float32", enforce_eager=True, max_model_len=2 * max_pairs + 16,
        max_num_seqs=64, **engine_kwargs,
    )


def run_all(llm, items, pairs_per_chunk: int) -> tuple[dict, dict]:
    """Each run's outputs (first answer token, OPRM's selection) and its seconds."""
    from vllm import SamplingParams

    from vllm_oprm import OPRMConfig, OPRMPrompt

    from .task import IDK_WORD

    params = SamplingParams(max_tokens=1, temperature=0.0)
    tokenizer = llm.tokenizer
    chunk_size = 2 * pairs_per_chunk
    prompts = [OPRMPrompt("", item.context, item.query) for item in items]
    vanilla = [{"prompt_token_ids": p.tokenize(tokenizer).vanilla_ids} for p in prompts]
    oracle = []
    for prompt, item in zip(prompts, items):
        tokens = prompt.tokenize(tokenizer)
        start = (item.pair_index // pairs_per_chunk) * chunk_size
        chunk = tokens.context_ids[start : start + chunk_size]
        oracle.append({"prompt_token_ids": tokens.prefix_ids + chunk + tokens.suffix_ids})
    idk = tuple(tokenizer.encode(IDK_WORD, add_special_tokens=False))
    requests = {
        "vanilla": (vanilla, None),
        "oprm + idk filter": (prompts, OPRMConfig(chunk_size=chunk_size, idk_token_ids=idk)),
        "oprm, no filter": (prompts, OPRMConfig(chunk_size=chunk_size)),
        "oracle chunk": (oracle, None),
    }
    outputs, seconds = {}, {}
    for run, (batch, config) in requests.items():
        start = time.perf_counter()
        outputs[run] = llm.generate(batch, params, oprm=config, use_tqdm=False)
        seconds[run] = time.perf_counter() - start
    return outputs, seconds


def score(outputs, items, pairs_per_chunk: int) -> dict:
    row = {}
    for run, outs in outputs.items():
        row[run] = sum(out.outputs[0].text.strip() == item.answer for out, item in zip(outs, items)) / len(items)
    for run in ("oprm + idk filter", "oprm, no filter"):
        right = sum(out.oprm.selected_chunk == item.pair_index // pairs_per_chunk for out, item in zip(outputs[run], items))
        row[f"{run}: right chunk"] = right / len(items)
    return row


def plot(table: list[dict], chance: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [row["pairs"] for row in table]
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in RUNS:
        ax.plot(pairs, [row[run] for row in table], marker="o", label=run)
    ax.axhline(chance, color="gray", linestyle=":", label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("key-value pairs in the context")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title("Associative recall, tiny Mamba2 through vLLM")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--multiples", default="1,2,4,8,16,32")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from .task import NUM_VALUES, recall_items

    t = training_pairs(args.checkpoint)
    multiples = [int(m) for m in args.multiples.split(",")]
    llm = load_engine(args.checkpoint, max(multiples) * t)
    table = []
    for multiple in multiples:
        items = recall_items(seed=multiple, count=args.items, pairs=multiple * t)
        outputs, _ = run_all(llm, items, t)
        table.append({"multiple": multiple, "pairs": multiple * t, **score(outputs, items, t)})
    chance = 1 / NUM_VALUES
    header = ["pairs", *RUNS, "oprm + idk filter: right chunk", "oprm, no filter: right chunk"]
    print(f"\nAssociative recall, T = {t} pairs, {args.items} questions per point, chance {chance:.3f}")
    print(" | ".join(f"{h:>14}" if i else f"{h:>6}" for i, h in enumerate(header)))
    for row in table:
        print(" | ".join(f"{row[h]:>14.3f}" if i else f"{row[h]:>6}" for i, h in enumerate(header)))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ar.json").write_text(json.dumps({"T": t, "items": args.items, "chance": chance, "table": table}, indent=1))
    plot(table, chance, args.out / "ar.png")
    print(f"wrote {args.out / 'ar.json'} and {args.out / 'ar.png'}")
    llm.llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
