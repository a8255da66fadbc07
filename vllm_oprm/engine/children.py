"""vLLM request objects of one OPRM request: its chunk children's parameters and the
parent's output assembled from them. Shared by the offline API and the server."""

from __future__ import annotations

import copy
import dataclasses

from vllm import SamplingParams
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import RequestOutputKind

from .capture import issue_capture_key
from .fanout import WARMUP, FanOut


def cumulative(params: SamplingParams) -> SamplingParams:
    """A copy that reports every step with all tokens so far (first tokens must be seen as they come)."""
    params = params.clone()
    params.output_kind = RequestOutputKind.CUMULATIVE
    return params


def child_params(params: SamplingParams, fanout: FanOut, chunk: int, max_model_len: int) -> SamplingParams:
    """The parent's parameters for one chunk row, marked for entropy capture.

    ``max_tokens`` is capped to what the row leaves of ``max_model_len``: the
    server's default was computed from the short template prompt, not the row.
    The warm-up only has to be prefilled: one greedy token, nothing captured.
    """
    if chunk == WARMUP:
        return SamplingParams(max_tokens=1, temperature=0.0, output_kind=RequestOutputKind.CUMULATIVE)
    child = cumulative(params)
    child.extra_args = {**(params.extra_args or {}), **issue_capture_key(fanout.child_id(chunk))}
    room = max_model_len - len(fanout.prompt_ids(chunk))
    if child.max_tokens is None or child.max_tokens > room:
        child.max_tokens = room
    return child


class ParentStream:
    """The parent's outputs, under the parent's id with ``.oprm``, in the caller's ``output_kind``.

    Call it after every child output once the selection is known (earlier
    outputs are caught up on the first call). ``select``/``last``: the winner's
    output. ``summarize``: the chunk answers in chunk order, joined by the
    separator; a chunk shows only once every chunk before it has finished, so
    the text only ever grows and can be streamed. Each call costs what is new
    since the last one, however many chunks and tokens came before: the
    summary is appended to in place, and deltas are cut from where the last
    call stopped.
    """

    def __init__(self, fanout: FanOut, kind: RequestOutputKind):
        self.fanout, self.kind = fanout, kind
        self.sent_tokens = self.sent_chars = 0  # of the streamed completion (the winner's, or the summary's chunk)
        # summarize: the chunk being streamed, whether its separator is out, and the summary so far
        self.chunk, self.chunk_shown, self.last_finish = 0, False, (None, None)
        self.summary = CompletionOutput(index=0, text="", token_ids=[], cumulative_logprob=None, logprobs=None)

    def __call__(self) -> RequestOutput | None:
        fanout = self.fanout
        if fanout.summarize:
            source, completion, prompt_ids = self._summary_delta()
        else:
            source = fanout.latest[fanout.selection().selected_chunk]
            completion, prompt_ids = self._winner_delta(source.outputs[0]), source.prompt_token_ids
        finished = fanout.done()
        # Text can come without tokens: a cumulative output's token list is vLLM's live one, so it may
        # already hold the tokens whose text only the next output carries.
        if not completion.token_ids and not completion.text and not finished:
            return None
        if self.kind == RequestOutputKind.FINAL_ONLY and not finished:
            return None
        if self.kind != RequestOutputKind.DELTA:  # a shallow copy, sharing the token list as vLLM's do
            completion = copy.copy(self.summary if fanout.summarize else source.outputs[0])
        out = copy.copy(source)
        out.request_id = fanout.parent_id
        out.prompt_token_ids = prompt_ids
        out.outputs = [completion]
        out.finished = finished
        out.oprm = fanout.selection()
        return out

    def _winner_delta(self, winner: CompletionOutput) -> CompletionOutput:
        delta = dataclasses.replace(
            winner,
            text=winner.text[self.sent_chars :],
            token_ids=winner.token_ids[self.sent_tokens :],
            logprobs=None if winner.logprobs is None else winner.logprobs[self.sent_tokens :],
        )
        self.sent_tokens, self.sent_chars = len(winner.token_ids), len(winner.text)
        return delta

    def _summary_delta(self) -> tuple[RequestOutput, CompletionOutput, list[int]]:
        """What the summary gained since the last call; ``self.summary`` is extended by it.

        Once every chunk is scored each one has an output in ``fanout.latest``."""
        fanout, summary, last = self.fanout, self.summary, len(self.fanout.rows) - 1
        text, token_ids, logprobs = [], [], []
        while self.chunk <= last:
            part = fanout.latest[self.chunk].outputs[0]
            if not self.chunk_shown:
                self.chunk_shown = True
                if self.chunk > 0:
                    text.append(fanout.config.summary_separator)
            text.append(part.text[self.sent_chars :])
            token_ids.extend(part.token_ids[self.sent_tokens :])
            if part.logprobs is not None:
                logprobs.extend(part.logprobs[self.sent_tokens :])
            self.sent_tokens, self.sent_chars = len(part.token_ids), len(part.text)
            if self.chunk not in fanout.finished:
                break
            self.last_finish = part.finish_reason, part.stop_reason
            self.chunk, self.chunk_shown, self.sent_tokens, self.sent_chars = self.chunk + 1, False, 0, 0
        source = fanout.latest[min(self.chunk, last)]
        finish_reason, stop_reason = self.last_finish if fanout.done() else (None, None)
        with_logprobs = source.outputs[0].logprobs is not None
        delta = CompletionOutput(
            index=0,
            text="".join(text),
            token_ids=token_ids,
            cumulative_logprob=None,
            logprobs=logprobs if with_logprobs else None,
            finish_reason=finish_reason,
            stop_reason=stop_reason,
        )
        summary.text += delta.text
        summary.token_ids.extend(token_ids)
        if with_logprobs:
            if summary.logprobs is None:
                summary.logprobs = []
            summary.logprobs.extend(logprobs)
        summary.finish_reason, summary.stop_reason = finish_reason, stop_reason
        return source, delta, fanout.joined_prompt_ids
