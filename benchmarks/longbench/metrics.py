"""LongBench's metrics for its English tasks, rule for rule, so scores equal ``eval.py``'s.

Written from LongBench's ``metrics.py`` and ``eval.py`` (THUDM/LongBench), with the same
libraries (``rouge`` for ROUGE-L, ``fuzzywuzzy`` for code edit similarity) and the same float
arithmetic, quirks included where they change a score.
"""

from __future__ import annotations

import re
import string
from collections import Counter

import numpy as np
from fuzzywuzzy import fuzz
from rouge import Rouge

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"\d+")
_ROUGE = Rouge()
BUCKETS = ("0-4k", "4-8k", "8k+")  # LongBench-E, by the item's ``length`` (words)


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation, then articles, then collapse whitespace (SQuAD style)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def qa_f1(prediction: str, truth: str, all_classes) -> float:
    """Token F1 of the normalized answers."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(truth).split()
    same = sum((Counter(predicted) & Counter(expected)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(expected)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, truth: str, all_classes) -> float:
    """ROUGE-L F of the ``rouge`` package; 0 where it raises (empty text, or its recursive
    LCS on a very long sentence), as LongBench's catch-all does."""
    try:
        return _ROUGE.get_scores([prediction], [truth], avg=True)["rouge-l"]["f"]
    except (ValueError, RecursionError):
        return 0.0


def classification(prediction: str, truth: str, all_classes) -> float:
    """1/k when the truth is among the k class names found in the prediction.

    Found names that are part of the truth (but not it) are dropped, as LongBench does it:
    removing from the list it iterates, so the name after each dropped one is never checked.
    """
    found = [name for name in all_classes if name in prediction]
    i = 0
    while i < len(found):
        if found[i] in truth and found[i] != truth:
            del found[i]
        i += 1
    return 1.0 / len(found) if truth in found else 0.0


def _share(numbers: list[str], target: str) -> float:
    """Fraction of the numbers in the prediction that are the target."""
    return numbers.count(target) / len(numbers) if numbers else 0.0


def retrieval(prediction: str, truth: str, all_classes) -> float:
    return _share(_NUMBER.findall(prediction), re.findall(r"Paragraph (\d+)", truth)[0])


def count(prediction: str, truth: str, all_classes) -> float:
    return _share(_NUMBER.findall(prediction), str(truth))


def code_similarity(prediction: str, truth: str, all_classes) -> float:
    """Edit similarity of the first line that is not a comment or a code fence."""
    lines = prediction.lstrip("\n").split("\n")
    line = next((ln for ln in lines if not any(mark in ln for mark in ("`", "#", "//"))), "")
    return fuzz.ratio(line, truth) / 100


METRICS = {
    **dict.fromkeys(
        ("narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "triviaqa"), qa_f1
    ),
    **dict.fromkeys(("gov_report", "qmsum", "multi_news", "samsum"), rouge_l),
    "trec": classification,
    "passage_retrieval_en": retrieval,
    "passage_count": count,
    **dict.fromkeys(("lcc", "repobench-p"), code_similarity),
}
FIRST_LINE = ("trec", "triviaqa", "samsum")  # few-shot tasks: the model goes on with the next example


def score_item(dataset: str, prediction: str, answers: list[str], all_classes) -> float:
    """The best score over the reference answers."""
    if dataset == "qasper" and normalize_answer(prediction) == "error":
        prediction = "unanswerable"  # the IDK prompt asked for "Error" in its place
    if dataset in FIRST_LINE:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = METRICS[dataset]
    return max([0.0] + [metric(prediction, truth, all_classes) for truth in answers])


def _item_scores(dataset: str, rows: list[dict]) -> list[float]:
    return [score_item(dataset, row["pred"], row["answers"], row["all_classes"]) for row in rows]


def score_dataset(dataset: str, rows: list[dict]) -> float:
    """Mean x100, rounded to 2 places; summed one by one as LongBench does (``sum``
    compensates rounding since Python 3.12, which can move the last digit)."""
    total = 0.0
    for score in _item_scores(dataset, rows):
        total += score
    return round(100 * total / len(rows), 2)


def score_by_length(dataset: str, rows: list[dict]) -> dict[str, float | None]:
    """LongBench-E: the mean x100 per length bucket (None for an empty bucket, where LongBench writes NaN).

    Rounded as numpy rounds a float64 (scale, round half to even, unscale), not as Python
    rounds a float: the two differ on some halves, and LongBench's value is numpy's.
    """
    buckets: dict[str, list[float]] = {name: [] for name in BUCKETS}
    for row, score in zip(rows, _item_scores(dataset, rows)):
        length = row["length"]
        buckets[BUCKETS[0] if length < 4000 else BUCKETS[1] if length < 8000 else BUCKETS[2]].append(score)
    return {name: float(round(100 * np.mean(scores), 2)) if scores else None for name, scores in buckets.items()}
