"""The multi-query associative-recall task: vocabulary, training batches, evaluation prompts.

A sequence is ``<bos> k1 v1 ... kN vN  q1 a1 ... qM aM``: N distinct keys with
random values, then M queries. A query whose key is in the context is answered
with its value; a query for an absent key is answered with the IDK word
``Error`` (the paper's IDK filter relies on the model saying so). Keys and
values are words of the word-level test tokenizer: ``w0..w767`` are keys,
``w768..w831`` values, so token id = 5 + word index.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_oprm.testing import IDK_ID, SPECIAL_TOKENS, BOS_ID

NUM_KEYS = 768
NUM_VALUES = 64
NUM_WORDS = NUM_KEYS + NUM_VALUES
FIRST_WORD_ID = len(SPECIAL_TOKENS)
KEY_IDS = torch.arange(NUM_KEYS) + FIRST_WORD_ID
VALUE_IDS = torch.arange(NUM_VALUES) + FIRST_WORD_ID + NUM_KEYS
IDK_WORD = SPECIAL_TOKENS[IDK_ID]


def training_batch(rng: torch.Generator, batch: int, pairs: int, queries: int, absent_fraction: float):
    """(input ids, target ids) of shape [batch, 1 + 2*pairs + 2*queries]; targets are -100
    except at answer positions (the token after each query)."""
    keys = torch.stack([KEY_IDS[torch.randperm(NUM_KEYS, generator=rng)[: pairs + queries]] for _ in range(batch)])
    present, spare = keys[:, :pairs], keys[:, pairs:]  # spare keys are absent from the context
    values = VALUE_IDS[torch.randint(0, NUM_VALUES, (batch, pairs), generator=rng)]
    pick = torch.randint(0, pairs, (batch, queries), generator=rng)
    absent = torch.rand(batch, queries, generator=rng) < absent_fraction
    query = torch.where(absent, spare, present.gather(1, pick))
    answer = torch.where(absent, torch.full_like(query, IDK_ID), values.gather(1, pick))
    context = torch.stack([present, values], dim=2).flatten(1)
    asked = torch.stack([query, answer], dim=2).flatten(1)
    ids = torch.cat([torch.full((batch, 1), BOS_ID), context, asked], dim=1)
    targets = torch.full_like(ids, -100)
    answer_positions = 1 + 2 * pairs + 2 * torch.arange(queries) + 1
    targets[:, answer_positions - 1] = ids[:, answer_positions]  # logits at the query predict the answer
    return ids, targets


@dataclass(frozen=True)
class RecallItem:
    """One evaluation question: the context as words, the query key, its value, where it is."""

    context: str
    query: str
    answer: str
    pair_index: int


def word(token_id: int) -> str:
    return f"w{token_id - FIRST_WORD_ID}"


def recall_items(seed: int, count: int, pairs: int) -> list[RecallItem]:
    """Questions over ``pairs`` key-value pairs, each asking a key that is present."""
    rng = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(count):
        keys = KEY_IDS[torch.randperm(NUM_KEYS, generator=rng)[:pairs]].tolist()
        values = VALUE_IDS[torch.randint(0, NUM_VALUES, (pairs,), generator=rng)].tolist()
        asked = int(torch.randint(0, pairs, (1,), generator=rng))
        context = " ".join(f"{word(k)} {word(v)}" for k, v in zip(keys, values))
        items.append(RecallItem(context, word(keys[asked]), word(values[asked]), asked))
    return items


def long_recall_items(seed: int, count: int, pairs: int, pairs_per_chunk: int) -> list[RecallItem]:
    """Questions over contexts longer than the 768 keys allow distinct: every run of
    ``pairs_per_chunk`` pairs (one OPRM chunk) has distinct keys, and the asked key
    appears once in the whole context, at a uniformly random pair."""
    rng = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(count):
        order = torch.randperm(NUM_KEYS, generator=rng)
        asked_key, others = int(KEY_IDS[order[0]]), KEY_IDS[order[1:]]
        keys = []
        for start in range(0, pairs, pairs_per_chunk):
            run = min(pairs_per_chunk, pairs - start)
            keys += others[torch.randperm(len(others), generator=rng)[:run]].tolist()
        asked = int(torch.randint(0, pairs, (1,), generator=rng))
        keys[asked] = asked_key
        values = VALUE_IDS[torch.randint(0, NUM_VALUES, (pairs,), generator=rng)].tolist()
        context = " ".join(f"{word(k)} {word(v)}" for k, v in zip(keys, values))
        items.append(RecallItem(context, word(asked_key), word(values[asked]), asked))
    return items
