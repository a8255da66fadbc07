"""OPRM over a dataset with N engine replicas, as a Ray Data pipeline.

    python -m vllm_oprm.entrypoints.ray_batch --input rows.jsonl --output out/ --model DIR \\
        --replicas 2 [--chunk-size 2000] [--mode select] [--idk Error] [--max-tokens 32] [--engine-args '{...}']

Each input row (jsonl or parquet) has ``prefix``, ``context`` and ``suffix``
(and any other columns, passed through). ``--replicas`` actors each hold one
``OPRMLLM`` (data parallel: no Ray executor inside vLLM), and every batch of
rows goes into one engine at once. Output rows add ``text``, ``num_chunks``,
``selected_chunk`` and ``entropies``, written as jsonl.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

from ..core.options import idk_setting


class OPRMPredictor:
    """A Ray Data actor: one OPRM engine, fed whole batches."""

    def __init__(self, model: str, oprm: dict[str, Any], sampling: dict[str, Any], engine_args: dict[str, Any]):
        from vllm import SamplingParams

        from vllm_oprm import OPRMLLM
        from vllm_oprm.core import parse_options

        self.llm = OPRMLLM(model=model, **engine_args)
        _, self.config = parse_options({**oprm, "context": "-"}, {}, self.llm.tokenizer)  # same fields as the server
        self.params = SamplingParams(**sampling)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from vllm_oprm import OPRMPrompt

        prompts = [OPRMPrompt(str(p), str(c), str(s)) for p, c, s in zip(batch["prefix"], batch["context"], batch["suffix"])]
        outs = self.llm.generate(prompts, self.params, oprm=self.config, use_tqdm=False)
        return {
            **batch,
            "text": np.array([out.outputs[0].text for out in outs], dtype=object),
            "num_chunks": np.array([out.oprm.num_chunks for out in outs]),
            "selected_chunk": np.array([-1 if out.oprm.selected_chunk is None else out.oprm.selected_chunk for out in outs]),
            "entropies": np.array([json.dumps(list(out.oprm.entropies)) for out in outs], dtype=object),
        }


def run(input_path: str, output_dir: str, model: str, replicas: int, oprm: dict, sampling: dict,
        engine_args: dict, batch_size: int = 64) -> None:
    import ray

    reader = ray.data.read_parquet if input_path.endswith(".parquet") else ray.data.read_json
    dataset = reader(input_path).map_batches(
        OPRMPredictor,
        fn_constructor_kwargs={"model": model, "oprm": oprm, "sampling": sampling, "engine_args": engine_args},
        concurrency=replicas,
        batch_size=batch_size,
        num_cpus=1,  # per replica; each engine starts its own worker processes
    )
    dataset.write_json(output_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="jsonl or parquet with prefix, context, suffix columns")
    parser.add_argument("--output", required=True, help="a directory for the jsonl output")
    parser.add_argument("--model", required=True)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--chunk-size", type=int)
    parser.add_argument("--mode")
    parser.add_argument("--idk", help="a one-token word, or a JSON list of token ids")
    parser.add_argument("--max-batch-tokens", type=int)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--engine-args", default="{}", help="JSON of vllm.LLM keyword arguments")
    args = parser.parse_args(argv)
    idk = idk_setting(args.idk, "--idk") if args.idk else None
    oprm = {"chunk_size": args.chunk_size, "mode": args.mode, "idk": idk, "max_batch_tokens": args.max_batch_tokens}
    run(
        args.input, args.output, args.model, args.replicas,
        oprm={k: v for k, v in oprm.items() if v is not None},
        sampling={"max_tokens": args.max_tokens, "temperature": args.temperature},
        engine_args=json.loads(args.engine_args), batch_size=args.batch_size,
    )


if __name__ == "__main__":
    main()
