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
from collections.abc import AsyncGenerator, Awaitable
from typing import Any, TypeVar

from vllm import SamplingParams
from vllm.outputs import RequestOutput

from ..core import ChunkRows, OPRMConfig, Selection
from .capture import take_records_from_every_engine, withdraw_capture_keys
from .children import ParentStream, child_params
from .fanout import Actions, FanOut
from .metrics import ABORTED_CHUNKS, logger, record_request


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


ENGINE_CHECK_S = 0.5  # how often a request waiting on an engine call checks that the engine is alive
T = TypeVar("T")
current_job: contextvars.ContextVar[OPRMJob | None] = contextvars.ContextVar("oprm_job", default=None)


class RowAdmission:
    """A server-wide cap on chunk rows in prefill (``--oprm-max-inflight-rows``).

    A row takes a place before it goes to the engine and gives it back once it is
    scored (its first token is out) or ends; rows beyond the cap wait in the order
    they were sent. Scored rows (a select request's running winner, summarize rows)
    decode without a place, and the fan-out waits for places in the rows' own tasks,
    never in the loop that scores them, so waiting rows cannot block the rows that
    would free a place.
    """

    def __init__(self, limit: int):
        if limit <= 0:
            raise ValueError(f"OPRM_MAX_INFLIGHT_ROWS must be positive, got {limit}")
        self._places = asyncio.Semaphore(limit)  # FIFO

    async def enter(self) -> None:
        await self._places.acquire()

    def leave(self) -> None:
        self._places.release()


class OPRMEngineClient:
    """Delegates everything to ``client`` except ``generate`` calls made under an ``OPRMJob``.

    ``admission`` caps chunk rows in prefill across every request it serves; with
    ``lower_child_priority`` (vLLM's ``--scheduling-policy priority``) chunk rows run
    one priority level below their request's, so plain requests go ahead of them.
    """

    def __init__(self, client: Any, admission: RowAdmission | None = None, lower_child_priority: bool = False):
        self._client = client
        self._admission = admission
        self._child_priority_offset = 1 if lower_child_priority else 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def generate(self, prompt: Any, sampling_params: Any, request_id: str, *args: Any, **kwargs: Any):
        job = current_job.get()
        if job is None or job.claimed or not isinstance(sampling_params, SamplingParams):
            return self._client.generate(prompt, sampling_params, request_id, *args, **kwargs)
        job.claimed = True  # one prompt per job; the server refuses prompt lists
        if self._child_priority_offset:
            kwargs = {**kwargs, "priority": kwargs.get("priority", 0) + self._child_priority_offset}
        job.outputs = self._fan_out(job, sampling_params, request_id, args, kwargs)
        return job.outputs

    async def _fan_out(
        self, job: OPRMJob, params: SamplingParams, parent_id: str, args: tuple, kwargs: dict
    ) -> AsyncGenerator[RequestOutput, None]:
        fanout = FanOut(parent_id, job.layout, job.config)
        arrivals: asyncio.Queue = asyncio.Queue()
        pumps: dict[int, asyncio.Task] = {}
        placed: set[int] = set()  # chunks holding a place in ``self._admission``

        def leave(chunk: int) -> None:
            if chunk in placed:
                placed.discard(chunk)
                self._admission.leave()

        async def pump(chunk: int, row: dict, child: SamplingParams) -> None:
            try:
                if self._admission is not None:
                    await self._admission.enter()
                    placed.add(chunk)
                # the engine sees the request when iteration starts
                async for output in self._client.generate(row, child, fanout.child_id(chunk), *args, **kwargs):
                    arrivals.put_nowait((chunk, output, None))
            except Exception as error:  # noqa: BLE001 - handed to the parent, which re-raises it
                arrivals.put_nowait((chunk, None, error))
            finally:
                leave(chunk)

        async def apply(actions: Actions) -> None:
            if actions.abort:
                for chunk in actions.abort:
                    pumps.pop(chunk).cancel()
                await self._answered(self._client.abort([fanout.child_id(c) for c in actions.abort]))
                ABORTED_CHUNKS.inc(len(actions.abort))
            for chunk in actions.add:
                row = {"prompt_token_ids": fanout.prompt_ids(chunk)}
                child = child_params(params, fanout, chunk, job.max_model_len)
                pumps[chunk] = asyncio.create_task(pump(chunk, row, child))

        stream = ParentStream(fanout, params.output_kind)
        try:
            await apply(fanout.start())
            while not fanout.done():
                arrived = [await arrivals.get()]
                while not arrivals.empty():  # score everything that came in together with one round trip
                    arrived.append(arrivals.get_nowait())
                for chunk, output, error in arrived:
                    if error is not None:
                        raise error
                    await apply(fanout.on_output(chunk, output))
                keys = fanout.score_keys()
                if keys:
                    records = await self._answered(take_records_from_every_engine(self._client, keys))
                    for key in keys:
                        leave(fanout.chunk_of(key))
                    await apply(fanout.on_records(records))
                if fanout.selector.done:
                    job.selection = fanout.selection()
                    update = stream()
                    if update is not None:
                        yield update
        finally:
            for task in pumps.values():
                task.cancel()
            # Shielded: a second cancellation (or the client going away again) must not cut the cleanup
            # short, or the children would keep running and their records stay in the workers.
            cleanup = asyncio.ensure_future(self._clean_up(fanout, job))
            _cleanups.add(cleanup)
            cleanup.add_done_callback(_cleanups.discard)
            await asyncio.shield(cleanup)

    async def _clean_up(self, fanout: FanOut, job: OPRMJob) -> None:
        """Count the request, then abort its live children and drop its unread records."""
        outcome = "finished" if fanout.done() else "abandoned"  # the caller went away, or an error
        record_request(fanout.parent_id, job.config.mode, job.selection, len(fanout.rows), outcome)
        withdraw_capture_keys([fanout.child_id(chunk) for chunk in range(len(fanout.rows))])
        live, unscored = fanout.live_children(), fanout.unscored_children()
        try:
            if live:
                ABORTED_CHUNKS.inc(len(live))
                await self._answered(self._client.abort(live))
            if unscored:  # drop first-token records nobody will read
                await self._answered(take_records_from_every_engine(self._client, unscored))
        except Exception:  # noqa: BLE001 - the engine is gone (its requests and records with it)
            logger.warning("oprm %s: cleanup could not reach the engine", fanout.parent_id, exc_info=True)

    async def _answered(self, call: Awaitable[T]) -> T:
        """``call``'s result, or the engine's error once it is dead: vLLM never answers a utility call
        that was waiting on an engine core when it died, so awaiting it alone would hang the request."""
        task = asyncio.ensure_future(call)
        try:
            while True:
                if self._client.errored:
                    raise self._client.dead_error
                done, _ = await asyncio.wait({task}, timeout=ENGINE_CHECK_S)
                if done:
                    return task.result()
        finally:
            task.cancel()


# Cleanups still running after their request's task was cancelled (asyncio keeps only weak references).
_cleanups: set[asyncio.Future] = set()
