"""Load and faults against `vllm-oprm serve` on 127.0.0.1: many requests at once, clients that go
away during chunk prefill or decode, a request with more chunks than the engine has slots."""

import asyncio
import threading
import time

import pytest
import torch

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

from vllm_oprm.testing import build_model_dir, collective_rpc, metric, oprm_server, words  # noqa: E402

MAX_NUM_SEQS = 24
GREEDY = {"max_tokens": 8, "temperature": 0.0}
EXACT = {"ignore_eos": True, "return_token_ids": True}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("mamba2"))
    build_model_dir("mamba2", path, seed=2)
    args = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "4096", "--max-num-seqs", str(MAX_NUM_SEQS)]
    # vLLM's dev mode serves POST /collective_rpc, through which the tests read the workers' record tables.
    with oprm_server(path, *args, "--oprm-chunk-size", "16", env={"VLLM_SERVER_DEV_MODE": "1"}) as running:
        yield running.url, path
        assert metric(running.url, "vllm:num_requests_running") == 0
        assert metric(running.url, "vllm:num_requests_waiting") == 0


def requests(seed, count, context_words):
    rng = torch.Generator().manual_seed(seed)
    return [(words(rng, 4), words(rng, context_words), words(rng, 3)) for _ in range(count)]


def body(path, prefix, context, suffix, oprm=None, **fields):
    if oprm is None:  # plain: the context inline
        return {"model": path, "prompt": f"{prefix} {context} {suffix}", **GREEDY, **fields, "extra_body": EXACT}
    extra = {**EXACT, "oprm": {"context": context, **oprm}}
    return {"model": path, "prompt": f"{prefix} {{{{context}}}} {suffix}", **GREEDY, **fields, "extra_body": extra}


def tokens(response):
    return response.choices[0].token_ids, getattr(response, "oprm", None)


def test_64_oprm_requests_with_plain_ones_at_once_equal_one_by_one(server):
    url, path = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    oprm = [body(path, *r, oprm={"max_batch_tokens": 80}) for r in requests(1, 64, 8 * 16 + 5)]  # 9 chunks
    plain = [body(path, *r) for r in requests(2, 16, 60)]
    alone = [tokens(client.completions.create(**b)) for b in oprm + plain]
    assert all(selection["num_chunks"] == 9 for _, selection in alone[:64])

    async def at_once():
        async_client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
        try:
            return await asyncio.gather(*(async_client.completions.create(**b) for b in oprm + plain))
        finally:
            await async_client.close()

    together = [tokens(r) for r in asyncio.run(at_once())]
    for (ids, selection), (ids_alone, selection_alone) in zip(together, alone):
        assert ids == ids_alone
        if selection_alone is not None:  # other batch shapes round differently: entropies to 1e-4
            assert selection["selected_chunk"] == selection_alone["selected_chunk"]
            assert selection["entropies"] == pytest.approx(selection_alone["entropies"], abs=1e-4)
    assert metric(url, "vllm:num_requests_running") == 0


def wait_until_idle(url, limit_s):
    """Seconds until the engine runs and queues nothing (polled every 20 ms), or None past the limit."""
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        if metric(url, "vllm:num_requests_running") == 0 and metric(url, "vllm:num_requests_waiting") == 0:
            return time.monotonic() - start
        time.sleep(0.02)
    return None


def wait_until_abandoned(url, before, limit_s=10.0):
    """Until the server counts one more abandoned OPRM request (its chunk requests are aborted, and their
    records dropped, just before it is counted). The limit catches a hang, not a slow abort: on a loaded 2-core
    machine an abort took 1.34 s once."""
    start = time.monotonic()
    while metric(url, "oprm_requests_total", outcome="abandoned") == before:
        assert time.monotonic() - start < limit_s, "the abandoned request was never cleaned up"
        time.sleep(0.02)


def test_client_gone_during_chunk_prefill_aborts_every_chunk(server):
    url, path = server
    # 200 chunks of 1000 tokens, one per batch: seconds of speculative prefill, scored batch by batch.
    prefix, context, suffix = requests(3, 1, 200 * 1000)[0]
    request = body(path, prefix, context, suffix, oprm={"chunk_size": 1000, "max_batch_tokens": 1100}, max_tokens=4)
    aborted, abandoned = metric(url, "oprm_aborted_chunks_total"), metric(url, "oprm_requests_total", outcome="abandoned")
    finished = metric(url, "oprm_requests_total", outcome="finished")
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=1.5)
    with pytest.raises(openai.APITimeoutError):
        client.completions.create(**request)  # the client gives up and closes the connection
    wait_until_abandoned(url, abandoned)
    assert metric(url, "oprm_requests_total", outcome="finished") == finished  # it was still prefilling
    assert metric(url, "oprm_aborted_chunks_total") > aborted
    assert wait_until_idle(url, 10.0) is not None


def test_client_gone_during_decode_leaves_other_requests_alone(server):
    url, path = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    neighbour = body(path, *requests(4, 1, 60)[0], max_tokens=300)
    expected = tokens(client.completions.create(**neighbour))
    abandoned = metric(url, "oprm_requests_total", outcome="abandoned")
    results = {}
    thread = threading.Thread(target=lambda: results.update(neighbour=tokens(client.completions.create(**neighbour))))
    thread.start()
    stream = client.completions.create(**body(path, *requests(5, 1, 100)[0], oprm={}, max_tokens=3000), stream=True)
    for number, _ in enumerate(stream):
        if number == 3:  # decoding from the winner
            break
    stream.close()
    wait_until_abandoned(url, abandoned)
    thread.join()
    assert results["neighbour"] == expected
    assert wait_until_idle(url, 5.0) is not None


def test_more_chunks_than_engine_slots_waits_and_completes(server):
    url, path = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    prefix, context, suffix = requests(6, 1, 3 * MAX_NUM_SEQS * 16)[0]  # 72 chunks, all in one batch
    one_batch = client.completions.create(**body(path, prefix, context, suffix, oprm={}, max_tokens=40))
    one_row_batches = client.completions.create(
        **body(path, prefix, context, suffix, oprm={"max_batch_tokens": 30}, max_tokens=40)
    )
    assert one_batch.oprm["num_chunks"] == 3 * MAX_NUM_SEQS
    assert tokens(one_batch) == tokens(one_row_batches)
    assert wait_until_idle(url, 5.0) is not None


def records_in_workers(url):
    return [int(count) for count in collective_rpc(url, "oprm_num_records")]


def test_200_mixed_requests_with_errors_and_disconnects_leave_no_records(server):
    """OPRM in every mode (streamed or not), plain, refused, and clients that leave during prefill or decode."""
    url, path = server
    short, long = requests(7, 100, 60), requests(8, 20, 40 * 16)

    async def one(client, number):
        prefix, context, suffix = short[number % 100]
        kind = number % 10
        if kind < 6:  # OPRM, select / summarize / last, every other one streamed
            mode = ["select", "select", "summarize", "last", "select", "summarize"][kind]
            request = body(path, prefix, context, suffix, oprm={"mode": mode, "max_batch_tokens": 40 + 20 * kind})
        elif kind == 6:
            request = body(path, prefix, context, suffix)
        elif kind == 7:  # refused: the reserved capture key
            request = body(path, prefix, context, suffix, oprm={})
            request["extra_body"]["vllm_xargs"] = {"oprm_capture": f"mine-{number}"}
        if kind <= 7:
            if kind % 2:
                async for _ in await client.completions.create(**request, stream=True):
                    pass
            else:
                await client.completions.create(**request)
        elif kind == 8:  # gone during chunk prefill: 40 chunks
            await client.with_options(timeout=0.3).completions.create(
                **body(path, *long[number // 10], oprm={"max_batch_tokens": 40})
            )
        else:  # gone while the winner decodes
            stream = await client.completions.create(**body(path, prefix, context, suffix, oprm={}, max_tokens=500), stream=True)
            async for index, _ in aiter_enumerate(stream):
                if index == 2:
                    break
            await stream.close()

    async def all_at_once():
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
        try:
            return await asyncio.gather(*(one(client, number) for number in range(200)), return_exceptions=True)
        finally:
            await client.close()

    outcomes = asyncio.run(all_at_once())
    errors = {number % 10: type(outcome).__name__ for number, outcome in enumerate(outcomes) if outcome is not None}
    assert set(errors) <= {7, 8}, errors
    assert errors[7] == "BadRequestError"
    assert wait_until_idle(url, 10.0) is not None
    assert records_in_workers(url) == [0]


async def aiter_enumerate(stream):
    number = 0
    async for item in stream:
        yield number, item
        number += 1
