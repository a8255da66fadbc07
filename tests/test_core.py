"""The pure core: config validation, prompt layout, chunking, batching, selection."""

import math
import subprocess
import sys

import pytest
import torch

from vllm_oprm import OPRMConfig, OPRMPrompt
from vllm_oprm.core import (
    ChunkSelector,
    aligned_chunk_size,
    build_rows,
    defaults_from_env,
    first_token_entropy,
    pack_documents,
    parse_options,
    plan_batches,
    split_tokens,
)


@pytest.mark.parametrize(
    "field, value",
    [
        ("chunk_size", 0), ("chunk_size", -5), ("chunk_size", 1.5), ("chunk_size", "2000"), ("chunk_size", True),
        ("max_batch_tokens", 0), ("max_batch_tokens", None), ("mode", "best"), ("mode", None),
        ("idk_token_ids", "Error"), ("idk_token_ids", [-1]), ("idk_token_ids", [1.0]), ("idk_token_ids", 7),
        ("summary_separator", 3), ("prefix_cache", 1), ("prefix_cache", "true"),
        ("early_exit_entropy", -0.1), ("early_exit_entropy", float("nan")), ("early_exit_entropy", float("inf")),
        ("early_exit_entropy", "0.5"), ("early_exit_entropy", True), ("chunk_order", "random"), ("chunk_order", None),
    ],
)
def test_invalid_config_field_is_named(field, value):
    with pytest.raises(ValueError, match=field):
        OPRMConfig(**{field: value})


def test_config_defaults_follow_the_paper():
    config = OPRMConfig(idk_token_ids=[5801])
    assert (config.chunk_size, config.max_batch_tokens, config.mode) == (2000, 120_000, "select")
    assert config.idk_token_ids == (5801,) and config.summary_separator == "\n"
    assert (config.early_exit_entropy, config.chunk_order) == (None, "forward")


def test_early_exit_is_refused_in_summarize_mode_and_an_integer_threshold_is_a_float():
    with pytest.raises(ValueError, match="early_exit_entropy does not apply to mode 'summarize'"):
        OPRMConfig(mode="summarize", early_exit_entropy=0.5)
    assert OPRMConfig(mode="last", early_exit_entropy=1).early_exit_entropy == 1.0


class SpaceTokenizer:
    """Each word is its id; BOS (=1) is added like a real tokenizer's specials."""

    def encode(self, text, add_special_tokens=True):
        return ([1] if add_special_tokens else []) + [int(w) for w in text.split()]


def test_parts_are_tokenized_separately_and_bos_only_in_prefix():
    tp = OPRMPrompt("10 11", "20 21 22", "30").tokenize(SpaceTokenizer())
    assert tp.prefix_ids == [1, 10, 11] and tp.documents == [[20, 21, 22]] and tp.suffix_ids == [30]
    mixed = OPRMPrompt([7], [5, 6], "30").tokenize(SpaceTokenizer())
    assert (mixed.prefix_ids, mixed.context_ids, mixed.suffix_ids) == ([7], [5, 6], [30])


@pytest.mark.parametrize(
    "prompt, message",
    [
        (OPRMPrompt("1", "", "2"), "context is empty"),
        (OPRMPrompt("1", [], "2"), "context is empty"),
        (OPRMPrompt("1", ["", ""], "2"), "context is empty"),
        (OPRMPrompt(3, "4", "2"), "prefix"),
        (OPRMPrompt("1", "4", [1, "x"]), "suffix"),
        (OPRMPrompt("1", [[1], 2], "2"), r"context\[1\]"),
        (OPRMPrompt("1", [-3], "2"), "negative"),
        (OPRMPrompt("1", 5, "2"), "context"),
    ],
)
def test_bad_prompt_parts_raise(prompt, message):
    with pytest.raises(ValueError, match=message):
        prompt.tokenize(SpaceTokenizer())


def test_template_splits_at_the_one_placeholder_and_chat_prefix_can_skip_bos():
    prompt = OPRMPrompt.from_template("10 11 {{context}} 30", "20 21")
    assert (prompt.prefix, prompt.context, prompt.suffix) == ("10 11 ", "20 21", " 30")
    assert prompt.tokenize(SpaceTokenizer(), add_special_tokens=False).prefix_ids == [10, 11]
    for template, count in [("10 30", 0), ("{{context}} {{context}}", 2)]:
        with pytest.raises(ValueError, match=f"exactly once, found {count}"):
            OPRMPrompt.from_template(template, "20")


def test_request_options_override_server_defaults():
    context, config = parse_options(
        {"context": ["20", "21"], "mode": "last", "idk": "4"}, {"chunk_size": 3, "mode": "summarize"}, SpaceTokenizer()
    )
    assert context == ["20", "21"]
    assert (config.chunk_size, config.mode, config.idk_token_ids) == (3, "last", (4,))
    assert parse_options({"context": "1", "idk": [4, 5]}, {}, SpaceTokenizer())[1].idk_token_ids == (4, 5)


@pytest.mark.parametrize(
    "options, message",
    [
        ("x", "oprm must be an object"),
        ({}, "oprm.context must be"),
        ({"context": "  "}, "oprm.context is empty"),
        ({"context": ["1", 2]}, "oprm.context must be"),
        ({"context": "1", "chunk_size": -1}, "oprm.chunk_size must be a positive integer"),
        ({"context": "1", "max_batch_tokens": True}, "oprm.max_batch_tokens"),
        ({"context": "1", "mode": "all"}, "oprm.mode must be one of"),
        ({"context": "1", "idk": "4 5"}, "oprm.idk '4 5' is 2 tokens"),
        ({"context": "1", "idk": [True]}, "oprm.idk must be"),
        ({"context": "1", "size": 3}, "unknown field.*size"),
        ({"context": "1", "prefix_cache": "yes"}, "oprm.prefix_cache must be true or false"),
        ({"context": "1", "early_exit_entropy": -1}, "oprm.early_exit_entropy must be a finite number"),
        ({"context": "1", "early_exit_entropy": float("nan")}, "oprm.early_exit_entropy must be a finite number"),
        ({"context": "1", "early_exit_entropy": "low"}, "oprm.early_exit_entropy must be a finite number"),
        ({"context": "1", "early_exit_entropy": 0.5, "mode": "summarize"}, "oprm.early_exit_entropy does not apply"),
        ({"context": "1", "chunk_order": "backward"}, "oprm.chunk_order must be one of"),
    ],
)
def test_bad_request_options_name_the_field(options, message):
    with pytest.raises(ValueError, match=message):
        parse_options(options, {}, SpaceTokenizer())


def test_server_defaults_come_from_the_environment():
    env = {"OPRM_CHUNK_SIZE": "1000", "OPRM_MODE": "summarize", "OPRM_IDK": "[4, 9]", "OPRM_MAX_BATCH_TOKENS": ""}
    assert defaults_from_env(env) == {"chunk_size": 1000, "mode": "summarize", "idk": [4, 9]}
    assert defaults_from_env({"OPRM_IDK": "Error"}) == {"idk": "Error"}
    with pytest.raises(ValueError, match="OPRM_CHUNK_SIZE must be an integer"):
        defaults_from_env({"OPRM_CHUNK_SIZE": "2k"})
    assert defaults_from_env({"OPRM_PREFIX_CACHE": "True"}) == {"prefix_cache": True}
    assert defaults_from_env({"OPRM_PREFIX_CACHE": "0"}) == {"prefix_cache": False}
    with pytest.raises(ValueError, match="OPRM_PREFIX_CACHE must be true or false"):
        defaults_from_env({"OPRM_PREFIX_CACHE": "maybe"})
    env = {"OPRM_EARLY_EXIT_ENTROPY": "0.25", "OPRM_CHUNK_ORDER": "reverse"}
    assert defaults_from_env(env) == {"early_exit_entropy": 0.25, "chunk_order": "reverse"}
    with pytest.raises(ValueError, match="OPRM_EARLY_EXIT_ENTROPY must be a number"):
        defaults_from_env({"OPRM_EARLY_EXIT_ENTROPY": "low"})


def test_a_server_wide_early_exit_skips_summarize_requests_but_not_select_ones():
    defaults = {"early_exit_entropy": 0.5}
    assert parse_options({"context": "1", "mode": "summarize"}, defaults, SpaceTokenizer())[1].early_exit_entropy is None
    assert parse_options({"context": "1"}, defaults, SpaceTokenizer())[1].early_exit_entropy == 0.5


def test_text_without_tokenizer_raises():
    with pytest.raises(ValueError, match="no tokenizer"):
        OPRMPrompt("a", [1], [2]).tokenize(None)


def test_equal_chunks_last_shorter():
    assert split_tokens(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert split_tokens(list(range(6)), 3) == [[0, 1, 2], [3, 4, 5]]


def test_documents_are_packed_whole_and_split_only_when_too_long():
    docs = [[1, 1], [2, 2, 2], [3], [4, 4, 4, 4, 4, 4, 4], [5]]
    assert pack_documents(docs, 4) == [[1, 1], [2, 2, 2, 3], [4, 4, 4, 4], [4, 4, 4, 5]]
    assert pack_documents([[1], [2], [3]], 2) == [[1, 2], [3]]


def test_rows_are_prefix_chunk_suffix_and_context_that_fits_is_vanilla():
    tp = OPRMPrompt([9], list(range(10, 17)), [8]).tokenize()
    rows = build_rows(tp, OPRMConfig(chunk_size=3))
    assert rows.rows == [[9, 10, 11, 12, 8], [9, 13, 14, 15, 8], [9, 16, 8]]
    single = build_rows(tp, OPRMConfig(chunk_size=7))
    assert single.rows == [tp.vanilla_ids] == [[9, *range(10, 17), 8]] and single.batches == [[0]]


@pytest.mark.parametrize(
    "prefix, chunk, block, expected",
    [(41, 64, 32, 55), (64, 64, 32, 64), (10, 2000, 256, 1782), (41, 8, 32, 23), (0, 100, 16, 96), (5, 3, 4, 3)],
)
def test_aligned_chunks_end_prefix_plus_chunk_on_a_block_boundary(prefix, chunk, block, expected):
    size = aligned_chunk_size(prefix, chunk, block)
    assert size == expected and (prefix + size) % block == 0
    assert size <= chunk or prefix + chunk < (prefix // block + 1) * block  # grows only when no boundary fits


def test_prefix_cache_rows_are_aligned_and_a_warmup_caches_the_prefix():
    prefix, context, suffix = list(range(100, 106)), list(range(200, 230)), [7, 8]
    tp = OPRMPrompt(prefix, context, suffix).tokenize()
    layout = build_rows(tp, OPRMConfig(chunk_size=12, prefix_cache=True), cache_block_size=4)
    assert [len(r) - len(prefix) - len(suffix) for r in layout.rows] == [10, 10, 10]  # 6 + 10 = 16
    assert [r[len(prefix) : -len(suffix)] for r in layout.rows] == [context[0:10], context[10:20], context[20:30]]
    assert layout.warmup == prefix[:4] + [prefix[4]]  # one token past P's last boundary (4)
    assert build_rows(tp, OPRMConfig(chunk_size=12), cache_block_size=None).warmup is None
    assert build_rows(tp, OPRMConfig(chunk_size=40, prefix_cache=True), cache_block_size=4).warmup is None  # one row
    fits = build_rows(tp, OPRMConfig(chunk_size=30, prefix_cache=True), cache_block_size=4)
    assert fits.rows == [tp.vanilla_ids] and fits.warmup is None  # one chunk stays the vanilla prompt
    short = OPRMPrompt([1, 2], context, suffix).tokenize()
    assert build_rows(short, OPRMConfig(chunk_size=12, prefix_cache=True), cache_block_size=4).warmup is None


def test_last_mode_keeps_the_last_chunk_size_tokens():
    tp = OPRMPrompt([9], [[1, 2, 3], [4, 5]], [8]).tokenize()
    assert build_rows(tp, OPRMConfig(chunk_size=4, mode="last")).rows == [[9, 2, 3, 4, 5, 8]]


def test_batches_respect_the_token_budget():
    assert plan_batches([5, 5, 5, 3], 10) == [[0, 1], [2, 3]]
    assert plan_batches([5, 5, 5, 3], 5) == [[0], [1], [2], [3]]
    assert plan_batches([5, 5, 5, 3], 100) == [[0, 1, 2, 3]]
    with pytest.raises(ValueError, match="max_batch_tokens"):
        plan_batches([5, 11], 10)
    assert plan_batches([5, 5, 5, 3], 10, order=[3, 2, 1, 0]) == [[3, 2], [1, 0]]
    with pytest.raises(ValueError, match="chunk row 3"):
        plan_batches([5, 5, 5, 11], 10, order=[3, 2, 1, 0])


def test_reverse_chunk_order_sends_the_last_chunks_first_with_the_same_rows():
    tp = OPRMPrompt([9], list(range(10, 20)), [8]).tokenize()
    forward = build_rows(tp, OPRMConfig(chunk_size=3, max_batch_tokens=10))
    reverse = build_rows(tp, OPRMConfig(chunk_size=3, max_batch_tokens=10, chunk_order="reverse"))
    assert reverse.rows == forward.rows and forward.batches == [[0, 1], [2, 3]]
    assert reverse.batches == [[3, 2], [1, 0]]


def test_entropy_is_full_vocabulary_natural_log_float32():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, -float("inf"), 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    h = first_token_entropy(logits.double())
    assert h.dtype == torch.float32
    assert h[0].item() == pytest.approx(math.log(4), abs=1e-6)
    assert h[1].item() == pytest.approx(0.0, abs=1e-6)
    p = torch.softmax(logits[2].double(), 0)
    assert h[2].item() == pytest.approx(float(-(p * p.log()).sum()), abs=1e-6)


def test_entropy_of_nan_or_inf_logits_is_nan_not_zero():
    """A NaN logit once gave 0 nats (NaN probabilities were masked out as zeros): the lowest
    entropy, so a broken chunk won."""
    logits = torch.tensor([[float("nan"), 0.0, 1.0], [float("inf"), 0.0, 1.0], [0.0, -200.0, -float("inf")]])
    h = first_token_entropy(logits)
    assert h[0].isnan() and h[1].isnan()
    assert h[2].item() == pytest.approx(0.0, abs=1e-6)  # underflow and -inf still add nothing


def test_selector_minimum_idk_filter_fallback_and_ties():
    sel = ChunkSelector(3, idk_token_ids=[7])
    for chunk, h, top in [(0, 0.5, 1), (1, 0.1, 7), (2, 0.3, 2)]:
        sel.add(chunk, h, top)
    assert sel.result().selected_chunk == 2  # chunk 1 is lower but answers IDK
    assert sel.result().entropies == [0.5, 0.1, 0.3]

    fallback = ChunkSelector(2, idk_token_ids=[7])
    fallback.add(0, 0.4, 7)
    fallback.add(1, 0.2, 7)
    assert fallback.result().selected_chunk == 1

    for order in ([0, 1, 2], [2, 1, 0], [1, 2, 0]):  # ties: earlier chunk wins in any arrival order
        tie = ChunkSelector(3)
        for chunk in order:
            tie.add(chunk, 0.25, 3)
        assert tie.result().selected_chunk == 0


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2]])
def test_selector_non_finite_entropy_never_wins_over_a_finite_one(order):
    entropies = [float("nan"), 0.7, float("inf"), 0.4]
    sel = ChunkSelector(4)
    for chunk in order:
        sel.add(chunk, entropies[chunk], 3)
    assert sel.result().selected_chunk == 3
    none_finite = ChunkSelector(3)
    for chunk in reversed(range(3)):
        none_finite.add(chunk, [float("inf"), float("nan"), float("-inf")][chunk], 3)
    assert none_finite.result().selected_chunk == 0  # all rank as +inf: the tie rule


def test_selector_is_confident_only_at_an_answering_winner_under_the_threshold():
    sel = ChunkSelector(4, idk_token_ids=[7], early_exit_entropy=0.2)
    sel.add(0, 0.05, 7)  # IDK: never a reason to stop, however low its entropy
    assert not sel.confident() and sel.winner == 0
    sel.add(1, float("nan"), 2)  # NaN ranks as +inf
    assert not sel.confident()
    sel.add(2, 0.2, 3)  # at the threshold counts
    assert sel.confident()
    sel.stop_early()
    result = sel.result()
    assert (result.selected_chunk, result.stopped_early, result.chunks_read) == (2, True, 3)
    assert result.entropies[3] is None and math.isnan(result.entropies[1])
    with pytest.raises(ValueError, match="early exit"):
        sel.add(3, 0.0, 3)

    off = ChunkSelector(2)
    off.add(0, 0.0, 3)
    assert not off.confident()
    with pytest.raises(RuntimeError, match="confident"):
        off.stop_early()


def test_selector_keeps_one_live_state_and_rejects_misuse():
    sel = ChunkSelector(3, idk_token_ids=[7])
    sel.add(0, 0.1, 7)
    assert sel.live_chunks() == {0}  # the all-IDK fallback, until a chunk answers
    sel.add(1, 0.9, 2)
    assert sel.live_chunks() == {1}
    with pytest.raises(RuntimeError):
        sel.result()
    with pytest.raises(ValueError):
        sel.add(1, 0.5, 2)
    with pytest.raises(ValueError):
        sel.add(3, 0.5, 2)


def test_core_and_reference_import_without_vllm():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'vllm' or name.startswith('vllm.'):\n"
        "            raise ImportError('vllm is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import vllm_oprm, vllm_oprm.core, vllm_oprm.reference\n"
        "from vllm_oprm.reference import OPRMGenerator\n"
        "assert not any(m == 'vllm' or m.startswith('vllm.') for m in sys.modules)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]
