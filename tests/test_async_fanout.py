"""The server's fan-out (``OPRMEngineClient``) on a real ``AsyncLLM`` in this process.

However a request ends (cancelled twice, its engine killed) the client gets an answer, the request
is counted, and no child, capture key or first-token record is left behind. The server-wide row
admission caps chunk rows in prefill across requests, and under priority scheduling plain requests
go ahead of chunk rows."""

import asyncio
import contextlib
import os
import signal

import psutil
import pytest
import torch

pytest.importorskip("vllm")

from vllm import SamplingParams  # noqa: E402
from vllm.engine.arg_utils import AsyncEngineArgs  # noqa: E402
from vllm.sampling_params import RequestOutputKind  # noqa: E402
from vllm.v1.engine.async_llm import AsyncLLM  # noqa: E402
from vllm.v1.engine.exceptions import EngineDeadError  # noqa: E402

from vllm_oprm import OPRMConfig, OPRMPrompt  # noqa: E402
from vllm_oprm.engine import capture, online  # noqa: E402
from vllm_oprm.engine.layout import plan_request  # noqa: E402
from vllm_oprm.engine.metrics import ABORTED_CHUNKS, REQUESTS  # noqa: E402
from vllm_oprm.engine.online import OPRMEngineClient, OPRMJob, RowAdmission, current_job  # noqa: E402
from vllm_oprm.testing import build_model_dir, words  # noqa: E402

MAX_MODEL_LEN = 1024
CONFIG = OPRMConfig(chunk_size=400, max_batch_tokens=4000)  # 20 chunk rows of ~400 tokens, in two batches
PARAMS = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True, output_kind=RequestOutputKind.DELTA)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("mamba2"))
    _, tokenizer = build_model_dir("mamba2", path, seed=1)
    return path, tokenizer


def engine_args(path, **overrides):
    settings = dict(
        model=path, dtype="float32", enforce_eager=True, max_model_len=MAX_MODEL_LEN, max_num_seqs=32,
        gpu_memory_utilization=0.5, logits_processors=[capture.PROCESSOR], worker_extension_cls=capture.WORKER_EXTENSION,
    )
    return AsyncEngineArgs(**{**settings, **overrides})


def oprm_outputs(client, tokenizer, request_id, config=CONFIG, seed=7):
    """The server's path: an ``OPRMJob`` in ``current_job``, then ``generate``."""
    rng = torch.Generator().manual_seed(seed)
    prompt = OPRMPrompt(words(rng, 5), words(rng, 8000), words(rng, 4))
    job = OPRMJob(plan_request(prompt, PARAMS, config, tokenizer, MAX_MODEL_LEN), config, MAX_MODEL_LEN)
    token = current_job.set(job)
    try:
        return client.generate({"prompt": "unused"}, PARAMS, request_id)
    finally:
        current_job.reset(token)


async def token_ids(outputs) -> list[int]:
    ids = []
    async for out in outputs:
        ids += out.outputs[0].token_ids
    return ids


async def start_oprm_request(engine, tokenizer, request_id):
    """An OPRM request consumed in a task; returns once its chunk rows are in the engine."""
    task = asyncio.create_task(token_ids(oprm_outputs(OPRMEngineClient(engine), tokenizer, request_id)))

    async def children_running():
        """the chunk rows are in the engine"""
        return engine.output_processor.get_num_unfinished_requests() > 0

    await until(children_running)
    return task


async def until(condition, limit_s=30.0):
    for _ in range(int(limit_s / 0.05)):
        if await condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {limit_s} s: {condition.__doc__}")


def requests_in_worker(worker) -> int:
    return len(worker.model_runner.requests)


def abandoned() -> float:
    return REQUESTS.labels(mode="select", outcome="abandoned")._value.get()


def test_cancelled_twice_during_prefill_leaves_nothing(model, monkeypatch):
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # to send requests_in_worker to the worker

    async def body():
        engine = AsyncLLM.from_engine_args(engine_args(model[0]))
        try:
            before = abandoned()
            task = await start_oprm_request(engine, model[1], "twice")
            task.cancel()
            await asyncio.sleep(0)  # the fan-out's cleanup starts and waits on the engine...
            task.cancel()  # ...and is cancelled again there
            with pytest.raises(asyncio.CancelledError):
                await task

            async def nothing_left():
                """the request was counted and no child, key or record is left"""
                records = await engine.collective_rpc("oprm_num_records")
                idle = engine.output_processor.get_num_unfinished_requests() == 0
                return abandoned() == before + 1 and records == [0] and idle and not capture._issued

            await until(nothing_left)
            # The engine core dropped the children too: after a plain request, its workers hold no
            # request (children left running would still hold their state slots and add records).
            plain = SamplingParams(max_tokens=3, temperature=0.0)
            async for out in engine.generate({"prompt_token_ids": [1, 10, 11]}, plain, "plain"):
                pass
            assert out.finished and len(out.outputs[0].token_ids) == 3
            assert await engine.collective_rpc(requests_in_worker) == [0]
            assert await engine.collective_rpc("oprm_num_records") == [0]
        finally:
            engine.shutdown()

    asyncio.run(body())


def kill_engine_core() -> None:
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):  # earlier engines' exited processes
            if "EngineCore" in process.name() + " ".join(process.cmdline()):
                os.kill(process.pid, signal.SIGKILL)


def test_engine_killed_during_a_worker_call_gives_the_client_an_error(model, monkeypatch):
    """The engine core dies just as the fan-out asks it for first-token records: vLLM never answers
    that call, and the client must get the engine's error instead of waiting for ever."""
    take = online.take_records_from_every_engine

    async def kill_then_take(client, keys):
        kill_engine_core()
        return await take(client, keys)

    monkeypatch.setattr(online, "take_records_from_every_engine", kill_then_take)

    async def body():
        engine = AsyncLLM.from_engine_args(engine_args(model[0]))
        try:
            before = abandoned()
            with pytest.raises(EngineDeadError):
                await asyncio.wait_for(token_ids(oprm_outputs(OPRMEngineClient(engine), model[1], "killed")), 60)
            assert abandoned() == before + 1 and not capture._issued and not online._cleanups
        finally:
            with contextlib.suppress(Exception):
                engine.shutdown()

    asyncio.run(body())


ONE_BATCH = OPRMConfig(chunk_size=400)  # all 20 rows in one batch


def test_admission_caps_chunk_rows_in_prefill_across_requests(model):
    """Two requests of 20 rows each: at most 3 rows in prefill server-wide (plus each request's running
    winner), where without the cap all 40 are in the engine at once; the answers do not change."""

    async def body():
        engine = AsyncLLM.from_engine_args(engine_args(model[0]))
        peak, sampling = [0], [True]

        async def sample():
            while sampling[0]:
                peak[0] = max(peak[0], engine.output_processor.get_num_unfinished_requests())
                await asyncio.sleep(0.002)

        async def two_requests(client):
            peak[0], sampling[0] = 0, True
            sampler = asyncio.create_task(sample())
            answers = await asyncio.gather(
                *(token_ids(oprm_outputs(client, model[1], f"r{seed}", ONE_BATCH, seed)) for seed in (1, 2))
            )
            sampling[0] = False
            await sampler
            return answers, peak[0]

        try:
            free, free_peak = await two_requests(OPRMEngineClient(engine))
            capped, capped_peak = await two_requests(OPRMEngineClient(engine, RowAdmission(3)))
        finally:
            engine.shutdown()
        assert capped == free and all(len(ids) == PARAMS.max_tokens for ids in capped)
        assert free_peak >= 30 and capped_peak <= 3 + 2, (free_peak, capped_peak)

    asyncio.run(body())


def test_under_priority_scheduling_plain_requests_go_ahead_of_chunk_rows(model):
    """Two engine slots, an OPRM request's 20 rows queued first: a plain request sent right after them is
    done before more than a few rows were scored (at the same priority it would wait for all of them)."""

    async def body():
        engine = AsyncLLM.from_engine_args(engine_args(model[0], max_num_seqs=2, scheduling_policy="priority"))
        client = OPRMEngineClient(engine, lower_child_priority=True)
        try:
            aborted = ABORTED_CHUNKS._value.get()
            oprm = asyncio.create_task(token_ids(oprm_outputs(client, model[1], "oprm", ONE_BATCH)))
            for _ in range(1000):  # the rows reach the engine within a few turns of the event loop
                if engine.output_processor.get_num_unfinished_requests() == 20:
                    break
                await asyncio.sleep(0)
            plain = SamplingParams(max_tokens=3, temperature=0.0)
            async for out in client.generate({"prompt_token_ids": [1, 10, 11]}, plain, "plain"):
                pass
            losers_before_plain = ABORTED_CHUNKS._value.get() - aborted
            assert out.finished and losers_before_plain <= 8, f"{losers_before_plain} of 19 losers went first"
            assert len(await oprm) == PARAMS.max_tokens
        finally:
            engine.shutdown()

    asyncio.run(body())
