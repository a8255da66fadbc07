"""`make demo`: OPRM vs vanilla through vLLM on the associative-recall Mamba2 shipped in benchmarks/ar/.

Contexts of 16x the pairs the model was trained on: vanilla's fixed-size state
overflows and it mostly guesses; OPRM splits the context into chunks of T pairs,
keeps the chunk whose first-token distribution is sharpest (dropping chunks that
answer "Error"), and answers from it.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # keep the table readable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--multiple", type=int, default=16, help="context pairs as a multiple of T")
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--show", type=int, default=6)
    args = parser.parse_args()

    from .evaluate import CHECKPOINT, load_engine, run_all, score, training_pairs
    from .task import recall_items

    t = training_pairs(CHECKPOINT)
    pairs = args.multiple * t
    llm = load_engine(CHECKPOINT, pairs)
    items = recall_items(seed=12345, count=args.items, pairs=pairs)
    outputs, seconds = run_all(llm, items, t)
    row = score(outputs, items, t)
    vanilla, oprm = outputs["vanilla"], outputs["oprm + idk filter"]

    print(f"\nassociative recall through vLLM: {pairs} key-value pairs per context ({2 * pairs} tokens), "
          f"the model was trained on at most T={t}")
    print(f"{'question':>8} {'true':>6} {'vanilla':>8} {'oprm':>6} {'chunks':>6} {'chosen':>6} {'key in':>6}")
    for i, item in enumerate(items[: args.show]):
        chosen = oprm[i].oprm
        print(f"{item.query:>8} {item.answer:>6} {vanilla[i].outputs[0].text.strip():>8} "
              f"{oprm[i].outputs[0].text.strip():>6} {chosen.num_chunks:>6} {chosen.selected_chunk:>6} "
              f"{item.pair_index // t:>6}")
    print(f"\naccuracy over {args.items} questions: vanilla {row['vanilla']:.2f}, "
          f"OPRM {row['oprm + idk filter']:.2f} (oracle chunk {row['oracle chunk']:.2f}); "
          f"time vanilla {seconds['vanilla']:.2f} s, OPRM {seconds['oprm + idk filter']:.2f} s")
    llm.llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
