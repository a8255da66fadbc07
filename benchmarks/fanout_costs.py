"""What OPRM's fan-out spends besides the winner: losers' decode tokens, and the cost of a streamed event.

    .venv/bin/python -m benchmarks.fanout_costs     # about 3 minutes on 2 CPU cores

1. Decode tokens spent by losers, per request, at 32 and 128 chunks of 2,000 tokens (tiny Mamba2 through
   ``OPRMLLM``, vLLM's token budget 8,192 per step, so the rows of a batch finish prefill over several
   steps). Counted by the engine: its generation tokens (``vllm:generation_tokens``) less the winner's,
   less each loser's first token (sampled by its prefill step, not a decode step).
2. Time OPRM's own code spends per streamed event in summarize mode at 8 vs 256 chunks: the fan-out's
   bookkeeping and the parent's delta (``FanOut.on_output`` + ``ParentStream``), fed the same cumulative
   ``RequestOutput`` objects the engine would send (built before the clock starts; no engine runs).

Prints both tables and writes results/fanout_costs.json.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
CHUNK, STEP_TOKENS, NEW_TOKENS, REQUESTS = 2000, 8192, 32, 3
STREAM_TOKENS = 32  # per chunk answer, streamed


def loser_tokens(chunk_counts=(32, 128)) -> list[dict]:
    from vllm import SamplingParams

    from vllm_oprm import OPRMLLM, OPRMConfig, OPRMPrompt
    from vllm_oprm.testing import build_model_dir, words

    path = tempfile.mkdtemp()
    build_model_dir("mamba2", path)
    llm = OPRMLLM(model=path, dtype="float32", max_model_len=CHUNK + 64, max_num_seqs=128,
                  max_num_batched_tokens=STEP_TOKENS, disable_log_stats=False)

    def generated() -> float:
        return next(m.value for m in llm.llm.get_metrics() if m.name == "vllm:generation_tokens")

    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    rng = torch.Generator().manual_seed(0)
    rows = []
    try:
        for chunks in chunk_counts:
            spent = []
            for _ in range(REQUESTS):
                prompt = OPRMPrompt(words(rng, 8), words(rng, chunks * CHUNK), words(rng, 6))
                before = generated()
                out = llm.generate([prompt], params, oprm=OPRMConfig(chunk_size=CHUNK), use_tqdm=False)[0]
                assert out.oprm.num_chunks == chunks
                spent.append(generated() - before - len(out.outputs[0].token_ids) - (chunks - 1))
            rows.append({"chunks": chunks, "loser_decode_tokens_per_request": statistics.mean(spent),
                         "per_request": spent, "winner_tokens": NEW_TOKENS})
    finally:
        llm.engine.engine_core.shutdown()
    return rows


def stream_event_cost(chunk_counts=(8, 256)) -> list[dict]:
    from vllm.outputs import CompletionOutput, RequestOutput
    from vllm.sampling_params import RequestOutputKind

    from vllm_oprm.core import ChunkRows, OPRMConfig
    from vllm_oprm.engine.children import ParentStream
    from vllm_oprm.engine.fanout import FanOut

    def output(chunk: int, count: int) -> RequestOutput:
        completion = CompletionOutput(
            index=0, text=" ".join(f"w{t}" for t in range(count)), token_ids=list(range(count)),
            cumulative_logprob=None, logprobs=None, finish_reason="length" if count == STREAM_TOKENS else None,
        )
        return RequestOutput(f"c{chunk}", None, [5] * 100, None, [completion], count == STREAM_TOKENS, num_cached_tokens=0)

    rows = []
    for chunks in chunk_counts:
        layout = ChunkRows([[5] * 100 for _ in range(chunks)], [list(range(chunks))])
        fanout = FanOut("bench", layout, OPRMConfig(mode="summarize"))
        fanout.start()
        first = [(c, output(c, 1)) for c in range(chunks)]
        for chunk, out in first:
            fanout.on_output(chunk, out)
        fanout.on_scores({c: (1.0, 7) for c in range(chunks)})
        # every chunk decodes a token per step, as they would side by side in the engine
        events = [(c, output(c, n)) for n in range(2, STREAM_TOKENS + 1) for c in range(chunks)]
        stream = ParentStream(fanout, RequestOutputKind.DELTA)
        stream()
        start = time.perf_counter()
        for chunk, out in events:
            fanout.on_output(chunk, out)
            stream()
        seconds = time.perf_counter() - start
        assert fanout.done()
        rows.append({"chunks": chunks, "events": len(events), "us_per_event": 1e6 * seconds / len(events)})
    return rows


def main() -> None:
    losers, stream = loser_tokens(), stream_event_cost()
    print(f"losers' decode tokens per request ({CHUNK}-token chunks, {STEP_TOKENS} tokens per engine step, "
          f"winner decodes {NEW_TOKENS}):")
    for row in losers:
        print(f"  {row['chunks']:>4} chunks: {row['loser_decode_tokens_per_request']:8.1f}")
    print(f"OPRM's time per streamed event, summarize mode, {STREAM_TOKENS} tokens per chunk answer:")
    for row in stream:
        print(f"  {row['chunks']:>4} chunks: {row['us_per_event']:8.2f} us ({row['events']} events)")
    print(f"  256 / 8 chunks: {stream[-1]['us_per_event'] / stream[0]['us_per_event']:.2f}x")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "fanout_costs.json"
    path.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "loser_tokens": losers, "stream_event": stream}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
