"""Train the tiny Mamba2 of the associative-recall benchmark on CPU and save it with its tokenizer.

    .venv/bin/python -m benchmarks.ar.train --out benchmarks/ar/checkpoint   # ~9 min on 2 cores

Multi-query AR with N ~ U[4, T] pairs per context (T=16 by default) and 8
queries, 40% of them for absent keys answered with the IDK word; loss on
answers only; AdamW with warm-up and a cosine schedule. The shipped checkpoint was made by
exactly this command.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
from tqdm import tqdm

from vllm_oprm.testing import build_tokenizer, tiny_config

from .task import NUM_WORDS, VALUE_IDS, training_batch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/ar/checkpoint")
    parser.add_argument("--max-pairs", type=int, default=16, help="T: the most pairs a training context holds")
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--absent-fraction", type=float, default=0.4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = torch.Generator().manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    tokenizer = build_tokenizer(args.out, num_words=NUM_WORDS)
    from transformers import AutoModelForCausalLM

    config = tiny_config("mamba2", len(tokenizer))
    config.chunk_size = 16  # the scan's block; short training rows run faster with small blocks
    model = AutoModelForCausalLM.from_config(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, step / 200) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
    )
    start, log = time.time(), []
    bar = tqdm(range(args.steps), desc="AR training")
    for step in bar:
        pairs = int(torch.randint(4, args.max_pairs + 1, (1,), generator=rng))
        ids, targets = training_batch(rng, args.batch, pairs, args.queries, args.absent_fraction)
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == args.steps - 1:
            answered = targets != -100
            accuracy = (logits.argmax(-1)[answered] == targets[answered]).float().mean().item()
            log.append({"step": step, "loss": loss.item(), "accuracy": accuracy, "seconds": time.time() - start})
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{accuracy:.3f}")
    model.eval().save_pretrained(args.out)
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump({"args": vars(args), "parameters": sum(p.numel() for p in model.parameters()),
                   "values": len(VALUE_IDS), "minutes": (time.time() - start) / 60, "log": log}, f, indent=1)


if __name__ == "__main__":
    main()
