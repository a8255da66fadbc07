"""The associative-recall task generator (pure logic; the benchmark itself runs through vLLM)."""

import torch

from benchmarks.ar.task import FIRST_WORD_ID, IDK_ID, KEY_IDS, VALUE_IDS, recall_items, training_batch


def test_training_answers_are_the_asked_keys_values_or_idk():
    ids, targets = training_batch(torch.Generator().manual_seed(0), batch=32, pairs=6, queries=8, absent_fraction=0.5)
    assert ids.shape == targets.shape == (32, 1 + 12 + 16)
    for row, target in zip(ids.tolist(), targets.tolist()):
        context = dict(zip(row[1:13:2], row[2:13:2]))
        assert len(context) == 6 and all(k in KEY_IDS for k in context) and all(v in VALUE_IDS for v in context.values())
        answered = [i for i, t in enumerate(target) if t != -100]
        assert answered == list(range(13, 29, 2))  # each query position predicts the token after it
        for i in answered:
            query, answer = row[i], row[i + 1]
            assert target[i] == answer == context.get(query, IDK_ID)
    assert (targets == IDK_ID).any() and ((targets != IDK_ID) & (targets != -100)).any()


def test_recall_items_ask_a_present_key_and_know_where_it_is():
    for item in recall_items(seed=1, count=20, pairs=40):
        words = item.context.split()
        assert len(words) == 80 and words[2 * item.pair_index] == item.query
        assert words[2 * item.pair_index + 1] == item.answer
        assert int(item.answer[1:]) + FIRST_WORD_ID in VALUE_IDS
