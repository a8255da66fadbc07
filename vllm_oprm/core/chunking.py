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


def aligned_chunk_size(prefix_length: int, chunk_size: int, block_size: int) -> int:
    """The chunk length nearest ``chunk_size`` from below for which ``[P, C_i]`` ends on a block boundary.

    vLLM's prefix cache keeps a recurrent state only at multiples of its block
    size, so ``prefix_length + length`` must be one: chunks shrink by less than
    a block, or grow to the first boundary after P when ``chunk_size`` is shorter.
    """
    end = (prefix_length + chunk_size) // block_size * block_size
    if end <= prefix_length:
        end = (prefix_length // block_size + 1) * block_size
    return end - prefix_length


def context_chunks(prompt: TokenizedPrompt, config: OPRMConfig, cache_block_size: int | None = None) -> list[TokenIds]:
    """The context chunks that become parallel rows ``[P, C_i, S]``; with
    ``cache_block_size`` their lengths are block aligned (see ``aligned_chunk_size``),
    unless the whole context fits in one chunk: that stays the vanilla prompt."""
    size = config.chunk_size
    if cache_block_size is not None and len(prompt.context_ids) > size:
        size = aligned_chunk_size(len(prompt.prefix_ids), size, cache_block_size)
    if config.mode == "last":
        return [prompt.context_ids[-size:]]
    if len(prompt.documents) == 1:
        return split_tokens(prompt.documents[0], size)
    return pack_documents(prompt.documents, size)


@dataclass(frozen=True)
class ChunkRows:
    """The speculative-prefill rows of one request and their batches."""

    rows: list[TokenIds]
    batches: list[list[int]]  # chunk indices, in order, per batch
    # A short request to run before the rows so that vLLM caches P's state: the
    # first row cut one token past P's last block boundary. None without a cache.
    warmup: TokenIds | None = None

    @property
    def num_chunks(self) -> int:
        return len(self.rows)


def plan_batches(row_lengths: list[int], max_batch_tokens: int, order: list[int] | None = None) -> list[list[int]]:
    """Rows consecutive in ``order`` (default: row order), greedily grouped so each batch's tokens fit the budget."""
    batches: list[list[int]] = []
    used = 0
    for index in range(len(row_lengths)) if order is None else order:
        length = row_lengths[index]
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


def build_rows(prompt: TokenizedPrompt, config: OPRMConfig, cache_block_size: int | None = None) -> ChunkRows:
    """Lay out ``[P, C_i, S]`` for every chunk and plan their prefill batches.

    ``cache_block_size`` (vLLM's prefix-cache block, given when
    ``config.prefix_cache``) aligns the chunks and adds the warm-up that caches
    P's state, when P spans at least one block and there is more than one row.
    """
    chunks = context_chunks(prompt, config, cache_block_size)
    rows = [prompt.prefix_ids + chunk + prompt.suffix_ids for chunk in chunks]
    warmup = None
    if cache_block_size is not None and len(rows) > 1:
        shared = len(prompt.prefix_ids) // cache_block_size * cache_block_size
        warmup = rows[0][: shared + 1] if shared else None
    order = list(range(len(rows)))
    if config.chunk_order == "reverse":
        order.reverse()
    return ChunkRows(rows, plan_batches([len(r) for r in rows], config.max_batch_tokens, order), warmup)
