"""Chunk selection: minimum first-token entropy with the IDK filter."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import torch


def first_token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats (float32) of the full-vocabulary softmax, per row.

    Tokens with zero probability (``-inf`` logits) add nothing, as in the limit;
    a row with a NaN (or ``+inf``) logit has a NaN entropy, which selection ranks last.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -torch.where(logp.isneginf(), 0.0, logp.exp() * logp).sum(dim=-1)


@dataclass(frozen=True)
class Selection:
    """What selection decided for one request, and (vLLM backends) what its prefill cost.

    ``prefill_tokens`` counts every token of every chunk request sent to the
    engine (with the prefix-cache warm-up); ``cached_tokens`` of those came from
    vLLM's prefix cache instead of being computed. After an early exit
    (``stopped_early``) the chunks never read have entropy None.
    """

    num_chunks: int
    selected_chunk: int | None  # None in summarize mode: every chunk is decoded
    entropies: list[float | None]
    prefill_tokens: int = 0
    cached_tokens: int = 0
    stopped_early: bool = False

    @property
    def computed_tokens(self) -> int:
        return self.prefill_tokens - self.cached_tokens

    @property
    def chunks_read(self) -> int:
        return sum(entropy is not None for entropy in self.entropies)


@dataclass
class ChunkSelector:
    """Running minimum-entropy selection over chunks that arrive in any order.

    A chunk beats the best so far when its entropy is strictly lower, or equal
    with a lower chunk index, so the result is the paper's strict ``<`` over
    chunks in order whatever order batches finish in. A non-finite entropy (NaN
    or inf logits) ranks as +inf: it never beats a finite one, and among
    non-finite ones the lowest index wins. Chunks whose argmax first token is an
    IDK token are dropped; if every chunk is dropped, all count.

    With ``early_exit_entropy`` the caller may stop once ``confident()``: the
    result is then the winner among the chunks added so far.
    """

    num_chunks: int
    idk_token_ids: Iterable[int] = ()
    early_exit_entropy: float | None = None
    stopped_early: bool = field(default=False, init=False)  # set by stop_early()
    _entropies: dict[int, float] = field(default_factory=dict)
    _best_answering: tuple[float, int] | None = None
    _best_any: tuple[float, int] | None = None

    def __post_init__(self) -> None:
        self.idk_token_ids = frozenset(self.idk_token_ids)

    def add(self, chunk: int, entropy: float, first_token_argmax: int) -> None:
        if not 0 <= chunk < self.num_chunks or chunk in self._entropies or self.stopped_early:
            raise ValueError(f"chunk {chunk} is out of range, was already added, or came after an early exit")
        entropy = float(entropy)
        self._entropies[chunk] = entropy
        key = (entropy if math.isfinite(entropy) else math.inf, chunk)  # NaN compares false both ways
        if self._best_any is None or key < self._best_any:
            self._best_any = key
        if first_token_argmax not in self.idk_token_ids:
            if self._best_answering is None or key < self._best_answering:
                self._best_answering = key

    @property
    def winner(self) -> int | None:
        """The chunk that wins among those added so far (None before any)."""
        best = self._best_answering or self._best_any
        return None if best is None else best[1]

    def live_chunks(self) -> set[int]:
        """Chunks whose states must stay alive: the winner, and while no chunk
        answers yet, the all-IDK fallback (the same chunk then)."""
        return set() if self.winner is None else {self.winner}

    def confident(self) -> bool:
        """Early exit may stop here: the running winner answers (is not an IDK chunk)
        with an entropy at or below ``early_exit_entropy`` (never with it off)."""
        threshold, best = self.early_exit_entropy, self._best_answering
        return threshold is not None and best is not None and best[0] <= threshold

    def stop_early(self) -> None:
        """No more chunks will be added: the winner so far is the result."""
        if not self.confident():
            raise RuntimeError("stop_early() without a confident winner")
        self.stopped_early = True

    @property
    def done(self) -> bool:
        return self.stopped_early or len(self._entropies) == self.num_chunks

    def result(self) -> Selection:
        if not self.done:
            raise RuntimeError(f"{len(self._entropies)} of {self.num_chunks} chunks were added")
        entropies = [self._entropies.get(i) for i in range(self.num_chunks)]
        return Selection(self.num_chunks, self.winner, entropies, stopped_early=self.stopped_early)
