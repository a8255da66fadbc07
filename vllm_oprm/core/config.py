"""OPRM settings shared by every backend (reference, vLLM offline, server)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MODES = ("select", "summarize", "last")
CHUNK_ORDERS = ("forward", "reverse")


def _require_positive_int(name: str, value: object) -> None:
    # bool is an int subclass; True as a chunk size is a bug, not a 1.
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class OPRMConfig:
    """How a long context is split, prefilled and reduced to one answer.

    chunk_size: context tokens per chunk (the paper's L; default 2000).
    max_batch_tokens: cap on the total tokens (P + C_i + S per row) of one
        speculative-prefill batch (the reference code's ``max_len_per_seg``).
    mode: ``"select"`` decodes the chunk with the lowest first-token entropy,
        ``"summarize"`` decodes every chunk and joins the answers in chunk order,
        ``"last"`` keeps only the last ``chunk_size`` context tokens.
    idk_token_ids: first tokens meaning "the answer is not here"; chunks whose
        argmax first token is one of them are dropped from selection.
    summary_separator: what joins the per-chunk answers in ``summarize`` mode.
    prefix_cache: lay rows out for vLLM's prefix cache of recurrent states
        (the engine needs ``enable_prefix_caching``): every ``[P, C_i]`` ends on a
        cache block boundary so a later question on the same context starts from
        its cached state, and P's state is computed once and shared.
    early_exit_entropy: opt-in early exit (nats; None = off, the paper's rule).
        After each batch is scored, if the running winner answers (is not an
        IDK chunk) with an entropy at or below this, the chunks not yet read are
        never prefilled. Select and last modes only: summarize reads every chunk.
    chunk_order: the order batches go out, ``"forward"`` or ``"reverse"`` (last
        chunk first, for contexts whose answer tends to sit near the question).
        Only what is read first changes; ties still go to the lower chunk index.
    """

    chunk_size: int = 2000
    max_batch_tokens: int = 120_000
    mode: str = "select"
    idk_token_ids: tuple[int, ...] = field(default=())
    summary_separator: str = "\n"
    prefix_cache: bool = False
    early_exit_entropy: float | None = None
    chunk_order: str = "forward"

    def __post_init__(self) -> None:
        _require_positive_int("chunk_size", self.chunk_size)
        _require_positive_int("max_batch_tokens", self.max_batch_tokens)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if isinstance(self.idk_token_ids, (str, bytes)) or not hasattr(self.idk_token_ids, "__iter__"):
            raise ValueError(f"idk_token_ids must be a sequence of token ids, got {self.idk_token_ids!r}")
        ids = tuple(self.idk_token_ids)
        for token_id in ids:
            if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
                raise ValueError(f"idk_token_ids must hold non-negative integers, got {token_id!r}")
        object.__setattr__(self, "idk_token_ids", ids)
        if not isinstance(self.summary_separator, str):
            raise ValueError(f"summary_separator must be a string, got {self.summary_separator!r}")
        if not isinstance(self.prefix_cache, bool):
            raise ValueError(f"prefix_cache must be true or false, got {self.prefix_cache!r}")
        threshold = self.early_exit_entropy
        if threshold is not None:
            number = isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
            if not number or not math.isfinite(threshold) or threshold < 0:
                raise ValueError(f"early_exit_entropy must be a finite number of nats >= 0, got {threshold!r}")
            if self.mode == "summarize":
                raise ValueError("early_exit_entropy does not apply to mode 'summarize', which decodes every chunk")
            object.__setattr__(self, "early_exit_entropy", float(threshold))
        if self.chunk_order not in CHUNK_ORDERS:
            raise ValueError(f"chunk_order must be one of {CHUNK_ORDERS}, got {self.chunk_order!r}")
