"""OPRM's Prometheus metrics, served on vLLM's own ``/metrics`` (same registry, also in
multiprocess mode), and one debug log line per request."""

from __future__ import annotations

import logging

from prometheus_client import Counter, Histogram

from ..core import Selection

logger = logging.getLogger("vllm_oprm")

REQUESTS = Counter("oprm_requests", "OPRM requests finished, by mode and outcome", ["mode", "outcome"])
CHUNKS = Histogram(
    "oprm_chunks_per_request", "Chunk rows an OPRM request was split into", buckets=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
)
SELECTED_ENTROPY = Histogram(
    "oprm_selected_entropy_nats",
    "First-token entropy of the selected chunk (select and last modes)",
    buckets=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8],
)
PREFILL_TOKENS = Counter(
    "oprm_prefill_tokens", "Prompt tokens of OPRM chunk requests, by source: vLLM's prefix cache or computed", ["source"]
)
ABORTED_CHUNKS = Counter("oprm_aborted_chunks", "Chunk requests aborted: losers, and chunks of abandoned requests")
EARLY_EXITS = Counter("oprm_early_exits", "OPRM requests that stopped reading chunks at a confident winner")


def record_request(request_id: str, mode: str, selection: Selection | None, num_chunks: int, outcome: str) -> None:
    """Count one finished request; ``selection`` is None when it ended before the choice."""
    REQUESTS.labels(mode=mode, outcome=outcome).inc()
    CHUNKS.observe(num_chunks)
    chosen = None if selection is None else selection.selected_chunk
    if selection is not None:
        PREFILL_TOKENS.labels(source="cached").inc(selection.cached_tokens)
        PREFILL_TOKENS.labels(source="computed").inc(selection.computed_tokens)
        if selection.stopped_early:
            EARLY_EXITS.inc()
    if chosen is not None:
        SELECTED_ENTROPY.observe(selection.entropies[chosen])
    logger.debug("oprm %s: mode %s, %d chunks, selected %s, %s", request_id, mode, num_chunks, chosen, outcome)
