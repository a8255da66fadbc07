"""One OPRM request as chunk child requests: which to add, which to abort, when it is done.

Engine-agnostic bookkeeping shared by the offline API and the server; the
caller owns the engine calls. Batches go out one at a time so at most
``max_batch_tokens`` of this request's chunk prefill is in flight; as soon as a
batch's first tokens and their entropies are known, every chunk but the
running winner is aborted (select), or all keep decoding (summarize).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ..core import ChunkRows, ChunkSelector, OPRMConfig, Selection

_serial = itertools.count()
WARMUP = -1  # the chunk index of the prefix-cache warm-up request (``ChunkRows.warmup``)


@dataclass
class Actions:
    add: list[int] = field(default_factory=list)  # chunks to submit now
    abort: list[int] = field(default_factory=list)  # chunks to abort now


class FanOut:
    """State of one parent request's chunk children."""

    def __init__(self, parent_id: str, layout: ChunkRows, config: OPRMConfig):
        self.parent_id = parent_id
        self.rows, self.batches, self.warmup = layout.rows, layout.batches, layout.warmup
        self.config = config
        self.selector = ChunkSelector(layout.num_chunks, config.idk_token_ids)
        self.next_batch = 0
        self.in_engine: set[int] = set()  # submitted, not finished or aborted
        self.first_token: set[int] = set()
        self.scored: set[int] = set()
        self.latest: dict[int, Any] = {}  # chunk -> its latest engine output
        self.finished: set[int] = set()
        self.cached_tokens: dict[int, int] = {}  # chunk -> prompt tokens vLLM took from its prefix cache
        self._tag = f"{parent_id}#oprm{next(_serial)}"

    # -- ids -------------------------------------------------------------------

    def child_id(self, chunk: int) -> str:
        return f"{self._tag}-{'warmup' if chunk == WARMUP else chunk}"

    def chunk_of(self, child_id: str) -> int:
        tail = child_id.rsplit("-", 1)[1]
        return WARMUP if tail == "warmup" else int(tail)

    def prompt_ids(self, chunk: int) -> list[int]:
        return self.warmup if chunk == WARMUP else self.rows[chunk]

    @property
    def summarize(self) -> bool:
        return self.config.mode == "summarize"

    # -- events ----------------------------------------------------------------

    def start(self) -> Actions:
        """The first requests: the warm-up alone if there is one (the rows then
        find P's state cached), else the first batch."""
        if self.warmup is not None:
            self.in_engine.add(WARMUP)
            return Actions(add=[WARMUP])
        return self._submit_next_batch()

    def on_output(self, chunk: int, output: Any) -> Actions:
        """A child's cumulative engine output (a ``RequestOutput``) arrived; the
        first batch goes out when the warm-up finishes.

        Outputs of chunks no longer in the engine (a loser's last output, queued
        before its abort) are ignored, so callers need not filter them."""
        if chunk not in self.in_engine:
            return Actions()
        self.cached_tokens[chunk] = output.num_cached_tokens or 0
        if chunk == WARMUP:
            if not output.finished:
                return Actions()
            self.in_engine.discard(WARMUP)
            return self._submit_next_batch()
        self.latest[chunk] = output
        if len(output.outputs[0].token_ids) > 0:
            self.first_token.add(chunk)
        if output.finished:
            self.finished.add(chunk)
            self.in_engine.discard(chunk)
        return Actions()

    def awaiting_scores(self) -> list[int]:
        """Chunks of the current batch whose first token is out but not yet scored,
        once the whole batch has its first tokens (then all are scored together)."""
        if self.next_batch == 0:
            return []  # the warm-up is still running
        batch = self.batches[self.next_batch - 1]
        if all(c in self.first_token for c in batch):
            return [c for c in batch if c not in self.scored]
        return []

    def score_keys(self) -> list[str]:
        """Capture keys of the chunks to score now (empty until a batch is complete)."""
        return [self.child_id(c) for c in self.awaiting_scores()]

    def on_records(self, records: Mapping[str, Sequence]) -> Actions:
        """Score the awaiting chunks from the worker's ``key -> (entropy, argmax)`` records."""
        keys = {chunk: self.child_id(chunk) for chunk in self.awaiting_scores()}
        missing = [key for key in keys.values() if key not in records]
        if missing:
            raise RuntimeError(
                f"no first-token record for chunk requests {missing[:3]}: "
                "is vLLM running OPRM's logits processor and worker extension?"
            )
        return self.on_scores({chunk: tuple(records[key]) for chunk, key in keys.items()})

    def on_scores(self, scores: dict[int, tuple[float, int]]) -> Actions:
        """(entropy, argmax) for every chunk of the current batch."""
        for chunk, (entropy, argmax) in sorted(scores.items()):
            self.selector.add(chunk, entropy, argmax)
            self.scored.add(chunk)
        actions = Actions()
        if not self.summarize:
            losers = sorted(c for c in self.in_engine if c != self.selector.winner)
            self.in_engine.difference_update(losers)
            actions.abort = losers
            for chunk in self.scored - {self.selector.winner}:
                self.latest.pop(chunk, None)
        if self.next_batch < len(self.batches):
            actions.add = self._submit_next_batch().add
        return actions

    def _submit_next_batch(self) -> Actions:
        batch = self.batches[self.next_batch]
        self.next_batch += 1
        self.in_engine.update(batch)
        return Actions(add=list(batch))

    # -- result ----------------------------------------------------------------

    def done(self) -> bool:
        if not self.selector.done:
            return False
        if self.summarize:
            return len(self.finished) == len(self.rows)
        return self.selector.winner in self.finished

    def selection(self) -> Selection:
        result = self.selector.result()
        submitted = self._submitted() + ([WARMUP] if self.warmup is not None else [])
        return dataclasses.replace(
            result,
            selected_chunk=None if self.summarize else result.selected_chunk,
            prefill_tokens=sum(len(self.prompt_ids(c)) for c in submitted),
            cached_tokens=sum(self.cached_tokens.get(c, 0) for c in submitted),
        )

    def live_children(self) -> list[str]:
        return [self.child_id(c) for c in sorted(self.in_engine)]

    def unscored_children(self) -> list[str]:
        """Submitted chunks never scored: their records, if any, are still in the worker."""
        return [self.child_id(c) for c in self._submitted() if c not in self.scored]

    def _submitted(self) -> list[int]:
        """Chunks of every batch submitted so far."""
        return [c for batch in self.batches[: self.next_batch] for c in batch]
