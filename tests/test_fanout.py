"""FanOut's scheduling rules and ParentStream's outputs, driven by a small simulated engine.

The engine here is a stand-in (pure logic): each chunk request finishes its
prefill after a random number of steps, then makes one token per step. The real
engine runs the same code in tests/test_vllm_offline.py and test_vllm_server.py.
"""

import math
import random

import pytest

pytest.importorskip("vllm")

from vllm.outputs import CompletionOutput, RequestOutput  # noqa: E402
from vllm.sampling_params import RequestOutputKind  # noqa: E402

from vllm_oprm.core import ChunkRows, ChunkSelector, OPRMConfig, plan_batches  # noqa: E402
from vllm_oprm.engine.children import ParentStream  # noqa: E402
from vllm_oprm.engine.fanout import FanOut  # noqa: E402

IDK = 99


def output(chunk: int, tokens: list[int], finished: bool) -> RequestOutput:
    completion = CompletionOutput(
        index=0, text="".join(f"<{chunk}.{t}>" for t in tokens), token_ids=list(tokens), cumulative_logprob=None,
        logprobs=None, finish_reason="length" if finished else None,
    )
    return RequestOutput(f"c{chunk}", None, [chunk], None, [completion], finished, num_cached_tokens=0)


def run(fanout: FanOut, scores, rng, max_tokens=4, kind=RequestOutputKind.DELTA):
    """Drive ``fanout`` to the end; returns (stream outputs, decode tokens per chunk, add order, the
    chunks that led right after they were scored)."""
    prefill_left, tokens, added, streamed, leaders = {}, {}, [], [], set()
    stream = ParentStream(fanout, kind)

    def apply(actions):
        for chunk in actions.abort:
            del prefill_left[chunk]
        assert not actions.add or fanout.scored.issuperset(added), "a batch went out before the last was scored"
        for chunk in actions.add:
            added.append(chunk)
            prefill_left[chunk], tokens[chunk] = rng.randint(0, 3), []

    apply(fanout.start())
    while not fanout.done():
        for chunk in sorted(prefill_left, key=lambda _: rng.random()):
            if prefill_left[chunk] > 0:
                prefill_left[chunk] -= 1
                continue
            tokens[chunk].append(len(tokens[chunk]))
            finished = len(tokens[chunk]) == max_tokens
            if finished:
                del prefill_left[chunk]
            apply(fanout.on_output(chunk, output(chunk, tokens[chunk], finished)))
        ready = [fanout.chunk_of(key) for key in fanout.score_keys()]
        apply(fanout.on_scores({c: scores[c] for c in ready}))
        leaders.update({fanout.selector.winner} & set(ready))
        if fanout.selector.done:
            update = stream()
            if update is not None:
                streamed.append(update)
    return streamed, tokens, added, leaders


def layout(num_chunks: int, batch: int) -> ChunkRows:
    rows = [[c] * 5 for c in range(num_chunks)]
    return ChunkRows(rows, [list(range(i, min(i + batch, num_chunks))) for i in range(0, num_chunks, batch)])


def expected_winner(scores) -> int:
    selector = ChunkSelector(len(scores), [IDK])
    for chunk, (entropy, argmax) in enumerate(scores):
        selector.add(chunk, entropy, argmax)
    return selector.winner


@pytest.mark.parametrize("seed", range(40))
def test_select_picks_the_in_order_winner_and_losers_stop_at_their_first_token(seed):
    rng = random.Random(seed)
    num_chunks = rng.randint(1, 12)
    # few distinct values: ties, IDK chunks and NaN are common
    scores = [(rng.choice([0.5, 1.0, 1.0, 2.0, float("nan")]), rng.choice([1, 2, IDK])) for _ in range(num_chunks)]
    fanout = FanOut("p", layout(num_chunks, rng.randint(1, 5)), OPRMConfig(idk_token_ids=[IDK]))
    streamed, tokens, added, leaders = run(fanout, scores, rng)
    winner = expected_winner(scores)
    assert fanout.selection().selected_chunk == winner
    assert sorted(added) == list(range(num_chunks))
    assert len(tokens[winner]) == 4 and streamed[-1].finished
    assert [t for out in streamed for t in out.outputs[0].token_ids] == [0, 1, 2, 3]
    # A chunk that did not lead once scored is aborted with its first token only.
    for chunk in set(range(num_chunks)) - leaders:
        assert len(tokens[chunk]) == 1, f"loser {chunk} decoded {len(tokens[chunk])} tokens"


def read_until_confident(scores, batches, threshold):
    """The early-exit rule written out plainly: read batches in order; after each one, the winner
    over every chunk read so far; stop if it answers with an entropy <= threshold.
    Returns (chunks read, winner, whether it stopped before the last batch)."""
    read = []
    for position, batch in enumerate(batches):
        read += batch
        answering = [c for c in read if scores[c][1] != IDK] or read
        winner = min(answering, key=lambda c: (scores[c][0] if math.isfinite(scores[c][0]) else math.inf, c))
        confident = scores[winner][1] != IDK and scores[winner][0] <= threshold
        if confident and position < len(batches) - 1:
            return sorted(read), winner, True
    return sorted(read), winner, False


@pytest.mark.parametrize("seed", range(40))
def test_early_exit_reads_batches_in_order_until_a_confident_answering_winner(seed):
    rng = random.Random(seed)
    num_chunks = rng.randint(1, 12)
    scores = [(rng.choice([0.1, 0.5, 1.0, 2.0, float("nan")]), rng.choice([1, 2, IDK])) for _ in range(num_chunks)]
    order = rng.choice(["forward", "reverse"])
    config = OPRMConfig(idk_token_ids=[IDK], early_exit_entropy=rng.choice([0.1, 0.5, 1.0]), chunk_order=order)
    chunks = list(range(num_chunks))[:: 1 if order == "forward" else -1]
    batches = plan_batches([5] * num_chunks, 5 * rng.randint(1, 4), chunks)
    fanout = FanOut("p", ChunkRows([[c] * 5 for c in range(num_chunks)], batches), config)
    streamed, tokens, added, _ = run(fanout, scores, rng)
    read, winner, stopped = read_until_confident(scores, batches, config.early_exit_entropy)
    selection = fanout.selection()
    assert sorted(added) == read
    assert (selection.selected_chunk, selection.stopped_early, selection.chunks_read) == (winner, stopped, len(read))
    assert [c for c, h in enumerate(selection.entropies) if h is not None] == read
    assert selection.prefill_tokens == 5 * len(read)
    assert [t for out in streamed for t in out.outputs[0].token_ids] == [0, 1, 2, 3]


@pytest.mark.parametrize("seed", range(20))
def test_summarize_streams_each_answer_once_in_chunk_order(seed):
    rng = random.Random(seed)
    num_chunks = rng.randint(1, 9)
    scores = [(rng.random(), 1) for _ in range(num_chunks)]
    config = OPRMConfig(mode="summarize", summary_separator=" | ")
    deltas, tokens, _, _ = run(FanOut("p", layout(num_chunks, 3), config), scores, rng)
    answers = [output(c, tokens[c], True).outputs[0].text for c in range(num_chunks)]
    assert "".join(out.outputs[0].text for out in deltas) == " | ".join(answers)
    assert [t for out in deltas for t in out.outputs[0].token_ids] == [t for c in range(num_chunks) for t in tokens[c]]
    assert [out.finished for out in deltas] == [False] * (len(deltas) - 1) + [True]
    assert deltas[-1].outputs[0].finish_reason == "length" and deltas[0].prompt_token_ids == [
        c for c in range(num_chunks) for _ in range(5)
    ]

    cumulative, tokens, _, _ = run(FanOut("p", layout(num_chunks, 3), config), scores, rng, kind=RequestOutputKind.CUMULATIVE)
    texts = [out.outputs[0].text for out in cumulative]
    assert texts[-1] == " | ".join(output(c, tokens[c], True).outputs[0].text for c in range(num_chunks))
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))
    assert cumulative[-1].outputs[0].token_ids == [t for c in range(num_chunks) for t in tokens[c]]


def test_text_that_comes_after_its_tokens_is_still_streamed():
    """vLLM's cumulative outputs share the request's live token list, so an output's list can already
    hold the next token while only the next output carries its text."""
    fanout = FanOut("p", layout(1, 1), OPRMConfig())
    fanout.start()
    live = [0]
    first = output(0, [0], False)
    first.outputs[0].token_ids = live
    fanout.on_output(0, first)
    fanout.on_scores({0: (0.5, 1)})
    stream = ParentStream(fanout, RequestOutputKind.DELTA)
    deltas = [stream()]
    live.append(1)  # the engine's next step, before its output reaches the fan-out
    deltas.append(stream())
    for count in (2, 3):
        later = output(0, list(range(count)), count == 3)
        later.outputs[0].token_ids = live
        fanout.on_output(0, later)
        deltas.append(stream())
        live.append(count)
    live.pop()
    streamed = [d for d in deltas if d is not None]
    assert "".join(d.outputs[0].text for d in streamed) == later.outputs[0].text
    assert [t for d in streamed for t in d.outputs[0].token_ids] == [0, 1, 2] and streamed[-1].finished


class Streamed:
    """Stands in for a chunk output already streamed in full: reading it again fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"a streamed chunk's output was read again ({name})")


def test_summarize_events_read_only_what_is_new():
    """Each event's cost must not grow with the chunks before it: once a chunk is streamed in full,
    no later event reads its output again (it used to rebuild and rejoin every answer)."""
    config = OPRMConfig(mode="summarize", summary_separator=" | ")
    fanout = FanOut("p", layout(4, 4), config)
    fanout.start()
    for chunk in range(4):
        fanout.on_output(chunk, output(chunk, [0], False))
    fanout.on_scores({chunk: (1.0, 1) for chunk in range(4)})
    stream, texts = ParentStream(fanout, RequestOutputKind.DELTA), []
    for chunk in range(4):
        fanout.on_output(chunk, output(chunk, [0, 1], True))
        texts.append(stream().outputs[0].text)
        fanout.latest[chunk] = Streamed()
    assert "".join(texts) == " | ".join(output(c, [0, 1], True).outputs[0].text for c in range(4))
