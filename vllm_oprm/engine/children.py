"""vLLM request objects of one OPRM request: its chunk children's parameters and the
parent's output assembled from them. Shared by the offline API and the server."""

from __future__ import annotations

import copy

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


def parent_output(fanout: FanOut) -> RequestOutput:
    """The parent's cumulative output so far, under the parent's id, with ``.oprm``.

    ``select``/``last``: the winner's output. ``summarize``: the chunk answers in
    chunk order, joined by the separator; a chunk shows only once every chunk
    before it has finished, so the text only ever grows and can be streamed.
    """
    selection = fanout.selection()
    if not fanout.summarize:
        source = fanout.latest[selection.selected_chunk]
        completion = copy.copy(source.outputs[0])
        prompt_token_ids = source.prompt_token_ids
    else:
        shown: list[RequestOutput] = []
        for chunk in range(len(fanout.rows)):
            if chunk not in fanout.latest:
                break
            shown.append(fanout.latest[chunk])
            if chunk not in fanout.finished:
                break
        source = shown[-1]
        parts = [out.outputs[0] for out in shown]
        logprobs = None
        if all(part.logprobs is not None for part in parts):
            logprobs = [entry for part in parts for entry in part.logprobs]
        complete = fanout.done()
        completion = CompletionOutput(
            index=0,
            text=fanout.config.summary_separator.join(part.text for part in parts),
            token_ids=[t for part in parts for t in part.token_ids],
            cumulative_logprob=None,
            logprobs=logprobs,
            finish_reason=parts[-1].finish_reason if complete else None,
            stop_reason=parts[-1].stop_reason if complete else None,
        )
        prompt_token_ids = [t for row in fanout.rows for t in row]
    out = copy.copy(source)
    out.request_id = fanout.parent_id
    out.prompt_token_ids = prompt_token_ids
    out.outputs = [completion]
    out.finished = fanout.done()
    out.oprm = selection
    return out
