"""Chunking of the context and token-budgeted batching of the chunk rows."""

from __future__ import annotations

from dataclasses import dataclass

from .config import OPRMConfig
from .prompt import TokenIds, TokenizedPrompt


def split_tokens(ids: TokenIds, chunk_size: int) -> list[TokenIds]:
    """Equal chunks of ``chunk_size`` tokens; the last one may be shorter."""
    return [ids[i : i + chunk_size] for i in range(0, len(ids), chunk_size)]


def pack_documents(documents: list[TokenIds], chunk_size: int) -> list[TokenIds]:
    """Pack whole documents, in order, into chunks of at most ``chunk_size`` tokens.

    A document is split only when it alone exceeds ``chunk_size``: it then fills
    chunks of its own and its remainder stays open for the documents after it.
    """
    chunks: list[TokenIds] = []
    current: TokenIds = []
    for doc in documents:
        if len(current) + len(doc) <= chunk_size:
            current = current + doc
            continue
        if current:
            chunks.append(current)
        pieces = split_tokens(doc, chunk_size)
        chunks.extend(pieces[:-1])
        current = pieces[-1]
    if current:
        chunks.append(current)
    return chunks


def context_chunks(prompt: TokenizedPrompt, config: OPRMConfig) -> list[TokenIds]:
    """The context chunks that become parallel rows ``[P, C_i, S]``."""
    if config.mode == "last":
        return [prompt.context_ids[-config.chunk_size :]]
    if len(prompt.documents) == 1:
        return split_tokens(prompt.documents[0], config.chunk_size)
    return pack_documents(prompt.documents, config.chunk_size)


@dataclass(frozen=True)
class ChunkRows:
    """The speculative-prefill rows of one request and their batches."""

    rows: list[TokenIds]
    batches: list[list[int]]  # chunk indices, in order, per batch

    @property
    def num_chunks(self) -> int:
        return len(self.rows)


def plan_batches(row_lengths: list[int], max_batch_tokens: int) -> list[list[int]]:
    """Consecutive rows, greedily grouped so each batch's tokens fit the budget."""
    batches: list[list[int]] = []
    used = 0
    for index, length in enumerate(row_lengths):
        if length > max_batch_tokens:
            raise ValueError(
                f"max_batch_tokens ({max_batch_tokens}) is smaller than chunk row {index} "
                f"({length} tokens of prefix + chunk + suffix)"
            )
        if batches and used + length <= max_batch_tokens:
            batches[-1].append(index)
            used += length
        else:
            batches.append([index])
            used = length
    return batches


def check_vocabulary(rows: list[TokenIds], vocab_size: int) -> None:
    """A ValueError naming the first token id the model has no embedding for."""
    for row in rows:
        bad = next((t for t in row if t >= vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the model's vocabulary ({vocab_size})")


def build_rows(prompt: TokenizedPrompt, config: OPRMConfig) -> ChunkRows:
    """Lay out ``[P, C_i, S]`` for every chunk and plan their prefill batches."""
    rows = [prompt.prefix_ids + chunk + prompt.suffix_ids for chunk in context_chunks(prompt, config)]
    return ChunkRows(rows, plan_batches([len(r) for r in rows], config.max_batch_tokens))
