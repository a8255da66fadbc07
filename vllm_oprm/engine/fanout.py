"""One OPRM request as chunk child requests: which to add, which to abort, when it is done.

Engine-agnostic bookkeeping shared by the offline API and the server; the
caller owns the engine calls. Batches go out one at a time so at most
``max_batch_tokens`` of this request's chunk prefill is in flight; the next
batch goes out once every chunk of the current one is scored. A chunk is scored
as soon as its first token is out, and in select mode every scored chunk but
the running winner is aborted at once: a scored loser can never win again
(``ChunkSelector``'s order is total and fixed), so no loser decodes while its
siblings still prefill. In summarize mode every chunk keeps decoding. With
``early_exit_entropy``, a batch that leaves a confident winner is the last one.
"""

from __future__ import annotations

import dataclasses
import functools
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
        self.selector = ChunkSelector(layout.num_chunks, config.idk_token_ids, config.early_exit_entropy)
        self.next_batch = 0
        self.in_engine: set[int] = set()  # submitted, not finished or aborted
        self.to_score: set[int] = set()  # first token out, (entropy, argmax) not read yet
        self.scored: set[int] = set()
        self.latest: dict[int, Any] = {}  # chunk -> its latest engine output
        self.finished: set[int] = set()
        self.cached_tokens: dict[int, int] = {}  # chunk -> prompt tokens vLLM took from its prefix cache
        self._tag = f"{parent_id}#oprm{next(_serial)}"
        self._selection: Selection | None = None

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
        if chunk not in self.scored and len(output.outputs[0].token_ids) > 0:
            self.to_score.add(chunk)
        if output.finished:
            self.finished.add(chunk)
            self.in_engine.discard(chunk)
        return Actions()

    def score_keys(self) -> list[str]:
        """Capture keys of the chunks whose first token is out and not yet scored."""
        return [self.child_id(c) for c in sorted(self.to_score)]

    def on_records(self, records: Mapping[str, Sequence]) -> Actions:
        """Score the chunks waiting for a score from the worker's ``key -> (entropy, argmax)`` records."""
        keys = {chunk: self.child_id(chunk) for chunk in sorted(self.to_score)}
        missing = [key for key in keys.values() if key not in records]
        if missing:
            raise RuntimeError(
                f"no first-token record for chunk requests {missing[:3]}: "
                "is vLLM running OPRM's logits processor and worker extension?"
            )
        return self.on_scores({chunk: tuple(records[key]) for chunk, key in keys.items()})

    def on_scores(self, scores: dict[int, tuple[float, int]]) -> Actions:
        """(entropy, argmax) of chunks whose first token is out, in any order and grouping."""
        for chunk, (entropy, argmax) in sorted(scores.items()):
            self.selector.add(chunk, entropy, argmax)
            self.scored.add(chunk)
            self.to_score.discard(chunk)
        actions = Actions()
        if not self.summarize:
            winner = self.selector.winner
            actions.abort = sorted(c for c in self.in_engine & self.scored if c != winner)
            self.in_engine.difference_update(actions.abort)
            for chunk in (self.latest.keys() & self.scored) - {winner}:
                del self.latest[chunk]
        if self.next_batch < len(self.batches) and self.scored.issuperset(self.batches[self.next_batch - 1]):
            if self.selector.confident():
                self.selector.stop_early()  # the later batches are never sent
            else:
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
        """The choice and the prefill cost; computed once, when the last chunk is scored
        (every submitted chunk has reported its cached tokens by then)."""
        if self._selection is None:
            result = self.selector.result()
            submitted = self._submitted() + ([WARMUP] if self.warmup is not None else [])
            self._selection = dataclasses.replace(
                result,
                selected_chunk=None if self.summarize else result.selected_chunk,
                prefill_tokens=sum(len(self.prompt_ids(c)) for c in submitted),
                cached_tokens=sum(self.cached_tokens.get(c, 0) for c in submitted),
            )
        return self._selection

    @functools.cached_property
    def joined_prompt_ids(self) -> list[int]:
        """Every row's prompt, in chunk order: the summarize parent's prompt."""
        return [t for row in self.rows for t in row]

    def live_children(self) -> list[str]:
        return [self.child_id(c) for c in sorted(self.in_engine)]

    def unscored_children(self) -> list[str]:
        """Submitted chunks never scored: their records, if any, are still in the worker."""
        return [self.child_id(c) for c in self._submitted() if c not in self.scored]

    def _submitted(self) -> list[int]:
        """Chunks of every batch submitted so far."""
        return [c for batch in self.batches[: self.next_batch] for c in batch]
