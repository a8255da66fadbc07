"""OPRM on vLLM's async engine: an engine client that turns one ``generate`` call into chunk children.

vLLM's OpenAI serving code calls ``engine_client.generate(prompt, params, request_id)``
and formats whatever comes back (streaming, usage, logprobs, stop strings).
``OPRMEngineClient`` wraps the real client; when the caller has set
``current_job`` (the server does so for a request with an ``oprm`` object), the
call fans out into one engine request per chunk row, scores each batch from the
worker's records, aborts the losers, and yields the parent's outputs under the
parent's request id in the caller's ``output_kind``. Anything else goes straight
to the real client.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
from collections.abc import AsyncGenerator
from typing import Any

from vllm import SamplingParams
from vllm.outputs import RequestOutput
from vllm.sampling_params import RequestOutputKind

from ..core import ChunkRows, OPRMConfig, Selection
from .capture import take_records_from_every_engine, withdraw_capture_keys
from .children import child_params, parent_output
from .fanout import Actions, FanOut
from .metrics import ABORTED_CHUNKS, record_request


@dataclasses.dataclass
class OPRMJob:
    """One request's validated layout; ``selection`` is filled in once it is known."""

    layout: ChunkRows
    config: OPRMConfig
    max_model_len: int
    selection: Selection | None = None
    claimed: bool = False
    # The fan-out generator, once vLLM has asked for it: the server closes it when the HTTP stream
    # ends, since the generators vLLM wraps around it are left to the garbage collector.
    outputs: AsyncGenerator[RequestOutput, None] | None = None


current_job: contextvars.ContextVar[OPRMJob | None] = contextvars.ContextVar("oprm_job", default=None)


class OPRMEngineClient:
    """Delegates everything to ``client`` except ``generate`` calls made under an ``OPRMJob``."""

    def __init__(self, client: Any):
        self._client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def generate(self, prompt: Any, sampling_params: Any, request_id: str, *args: Any, **kwargs: Any):
        job = current_job.get()
        if job is None or job.claimed or not isinstance(sampling_params, SamplingParams):
            return self._client.generate(prompt, sampling_params, request_id, *args, **kwargs)
        job.claimed = True  # one prompt per job; the server refuses prompt lists
        job.outputs = self._fan_out(job, sampling_params, request_id, args, kwargs)
        return job.outputs

    async def _fan_out(
        self, job: OPRMJob, params: SamplingParams, parent_id: str, args: tuple, kwargs: dict
    ) -> AsyncGenerator[RequestOutput, None]:
        fanout = FanOut(parent_id, job.layout, job.config)
        arrivals: asyncio.Queue = asyncio.Queue()
        pumps: dict[int, asyncio.Task] = {}

        async def pump(chunk: int, outputs: AsyncGenerator[RequestOutput, None]) -> None:
            try:
                async for output in outputs:
                    arrivals.put_nowait((chunk, output, None))
            except Exception as error:  # noqa: BLE001 - handed to the parent, which re-raises it
                arrivals.put_nowait((chunk, None, error))

        async def apply(actions: Actions) -> None:
            if actions.abort:
                for chunk in actions.abort:
                    pumps.pop(chunk).cancel()
                await self._client.abort([fanout.child_id(c) for c in actions.abort])
                ABORTED_CHUNKS.inc(len(actions.abort))
            for chunk in actions.add:
                row = {"prompt_token_ids": fanout.prompt_ids(chunk)}
                params_c = child_params(params, fanout, chunk, job.max_model_len)
                outputs = self._client.generate(row, params_c, fanout.child_id(chunk), *args, **kwargs)
                pumps[chunk] = asyncio.create_task(pump(chunk, outputs))

        emit = _Emitter(params.output_kind)
        try:
            await apply(fanout.start())
            while not fanout.done():
                chunk, output, error = await arrivals.get()
                if error is not None:
                    raise error
                await apply(fanout.on_output(chunk, output))
                keys = fanout.score_keys()
                if keys:
                    records = await take_records_from_every_engine(self._client, keys)
                    await apply(fanout.on_records(records))
                if fanout.selector.done:
                    job.selection = fanout.selection()
                    update = emit(parent_output(fanout))
                    if update is not None:
                        yield update
        finally:
            for task in pumps.values():
                task.cancel()
            live, unscored = fanout.live_children(), fanout.unscored_children()
            if live:
                ABORTED_CHUNKS.inc(len(live))
                await self._client.abort(live)
            outcome = "finished" if fanout.done() else "abandoned"  # the caller went away, or an error
            record_request(parent_id, job.config.mode, job.selection, len(fanout.rows), outcome)
            withdraw_capture_keys([fanout.child_id(chunk) for chunk in range(len(fanout.rows))])
            if unscored:  # drop first-token records nobody will read
                await take_records_from_every_engine(self._client, unscored)


class _Emitter:
    """Turns the parent's cumulative outputs into what ``output_kind`` asks for."""

    def __init__(self, kind: RequestOutputKind):
        self.kind = kind
        self.tokens = 0
        self.chars = 0

    def __call__(self, output: RequestOutput) -> RequestOutput | None:
        if self.kind == RequestOutputKind.CUMULATIVE:
            return output
        if self.kind == RequestOutputKind.FINAL_ONLY:
            return output if output.finished else None
        completion = output.outputs[0]
        if len(completion.token_ids) == self.tokens and not output.finished:
            return None
        delta = dataclasses.replace(
            completion,
            text=completion.text[self.chars :],
            token_ids=completion.token_ids[self.tokens :],
            logprobs=None if completion.logprobs is None else completion.logprobs[self.tokens :],
        )
        self.tokens, self.chars = len(completion.token_ids), len(completion.text)
        output.outputs = [delta]
        return output
