"""OPRM through `vllm-oprm serve` (vLLM's OpenAI server, CPU build) with the `openai` client.

Every OPRM answer is checked against the reference backend on the same model.
"""

import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

from vllm_oprm.reference import OPRMGenerator  # noqa: E402
from vllm_oprm.testing import build_model_dir, importable_from, metric, oprm_server  # noqa: E402

from paced_decode import PACE_KEY  # noqa: E402
from families import families  # noqa: E402
from reference_checks import (  # noqa: E402
    CHUNK, EXACT, GREEDY, assert_matches, assert_served_mode_equals_reference, assert_served_select_equals_reference,
    assert_served_single_chunk_equals_vanilla, complete, layout, reference, template,
)

MAX_MODEL_LEN = 2048


@pytest.fixture(scope="module", params=families("mamba2", "falcon_mamba", "rwkv6", "recurrent_gemma", "rwkv7"))
def server(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(request.param))
    model, tokenizer = build_model_dir(request.param, path, seed=1)
    args = [
        "--dtype", "float32", "--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "16",
        "--logits-processors", "paced_decode:PacedDecode", "--oprm-chunk-size", str(CHUNK),
        "--no-enable-prefix-caching",  # vLLM's default for hybrids is on; tests/test_prefix_cache.py serves with it
    ]
    with oprm_server(path, *args, env=importable_from(os.path.dirname(__file__))) as running:
        url = running.url
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        yield url, client, path, OPRMGenerator(model, tokenizer)
        assert metric(url, "vllm:num_requests_running") == 0  # nothing left holding a state slot
        assert metric(url, "vllm:num_requests_waiting") == 0


@pytest.mark.parametrize("budget", [26, 60, 100_000])  # one row per batch, two rows, all rows
def test_completion_select_equals_reference(server, budget):
    assert_served_select_equals_reference(server, budget, context_words=70, num_chunks=5)


@pytest.mark.parametrize("mode", ["summarize", "last"])
def test_completion_modes_equal_reference(server, mode):
    assert_served_mode_equals_reference(server, mode)


def test_idk_text_drops_chunks(server):
    parts = layout(seed=3)
    plain = reference(server, *parts)
    # Make the winner's first token the IDK word: its chunk must drop out of the selection.
    idk_word = server[3].tokenizer.decode([plain.token_ids[0]])
    out = complete(server, *parts, oprm={"idk": idk_word})
    ref = reference(server, *parts, idk_token_ids=(plain.token_ids[0],))
    assert ref.selected_chunk != plain.selected_chunk or ref.num_chunks == 1
    assert_matches(out.choices[0], out.oprm, ref)


@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_early_exit_reads_the_chunks_the_reference_reads_and_is_counted(server, order):
    url = server[0]
    parts = layout(seed=13)
    entropies = reference(server, *parts, max_batch_tokens=26).entropies  # one chunk per batch
    # A threshold met within the first three chunks read: the last two are never prefilled.
    threshold = min(entropies[:3] if order == "forward" else entropies[2:]) + 1e-3
    options = {"max_batch_tokens": 26, "early_exit_entropy": threshold, "chunk_order": order}
    exits, prompt_tokens = metric(url, "oprm_early_exits_total"), metric(url, "vllm:prompt_tokens_total")
    out = complete(server, *parts, oprm=options)
    ref = reference(server, *parts, **options)
    assert ref.stopped_early and out.oprm["stopped_early"]
    assert out.oprm["chunks_read"] == sum(h is not None for h in ref.entropies) <= 3
    assert_matches(out.choices[0], out.oprm, ref)
    assert metric(url, "oprm_early_exits_total") == exits + 1
    assert metric(url, "vllm:prompt_tokens_total") - prompt_tokens == out.oprm["prefill_tokens"]["total"]


def test_single_chunk_equals_vanilla(server):
    assert_served_single_chunk_equals_vanilla(server)


@pytest.mark.parametrize("mode", ["select", "summarize"])
def test_streaming_equals_non_streaming(server, mode):
    parts = layout(seed=5)
    whole = complete(server, *parts, oprm={"mode": mode})
    events = list(complete(server, *parts, oprm={"mode": mode}, stream=True))
    text = "".join(event.choices[0].text for event in events if event.choices)
    assert text == whole.choices[0].text
    assert [t for e in events if e.choices for t in e.choices[0].token_ids or []] == whole.choices[0].token_ids
    assert all(event.oprm == events[-1].oprm for event in events)
    # A request's rows may be split differently over engine steps from run to run: same choice,
    # entropies equal to float rounding.
    assert events[-1].oprm["selected_chunk"] == whole.oprm["selected_chunk"]
    assert events[-1].oprm["entropies"] == pytest.approx(whole.oprm["entropies"], abs=1e-4)


def test_chat_equals_reference_and_streams(server):
    prefix, context, suffix = layout(seed=9)
    _, client, path, _ = server
    request = {
        "model": path,
        "messages": [{"role": "user", "content": template(prefix, suffix)}],
        **GREEDY,
        "extra_body": {**EXACT, "oprm": {"context": context, "max_batch_tokens": 60}},
    }
    out = client.chat.completions.create(**request)
    ref = reference(server, prefix, context, suffix, max_batch_tokens=60)  # template: <bos> + content
    assert_matches(out.choices[0], out.oprm, ref)
    events = list(client.chat.completions.create(**request, stream=True))
    streamed = "".join(e.choices[0].delta.content or "" for e in events if e.choices)
    assert streamed == out.choices[0].message.content
    assert events[-1].oprm["selected_chunk"] == out.oprm["selected_chunk"]
    assert events[-1].oprm["entropies"] == pytest.approx(out.oprm["entropies"], abs=1e-4)


def test_concurrent_oprm_and_plain_requests(server):
    _, client, path, _ = server
    jobs = [("oprm", layout(seed=20 + i), mode) for i, mode in enumerate(["select", "summarize", "select", "last"])]
    plain_prompts = [" ".join(layout(seed=30 + i)) for i in range(3)]
    expected_plain = [
        client.completions.create(model=path, prompt=p, **GREEDY, extra_body=EXACT).choices[0].token_ids
        for p in plain_prompts
    ]

    def run_oprm(job):
        _, parts, mode = job
        return complete(server, *parts, oprm={"mode": mode})

    def run_plain(prompt):
        return client.completions.create(model=path, prompt=prompt, **GREEDY, extra_body=EXACT).choices[0].token_ids

    with ThreadPoolExecutor(len(jobs) + len(plain_prompts)) as pool:
        oprm_futures = [pool.submit(run_oprm, job) for job in jobs]
        plain_futures = [pool.submit(run_plain, p) for p in plain_prompts]
        for (_, parts, mode), future in zip(jobs, oprm_futures):
            out = future.result()
            assert_matches(out.choices[0], out.oprm, reference(server, *parts, mode=mode))
        assert [f.result() for f in plain_futures] == expected_plain


def test_oprm_metrics_count_requests_chunks_and_entropy(server):
    url = server[0]
    before = {name: metric(url, name) for name in (
        "oprm_chunks_per_request_count", "oprm_chunks_per_request_sum", "oprm_selected_entropy_nats_sum",
        "oprm_aborted_chunks_total",
    )}
    finished = metric(url, "oprm_requests_total", mode="select", outcome="finished")
    out = complete(server, *layout(seed=19), oprm={"max_batch_tokens": 100_000})
    assert metric(url, "oprm_requests_total", mode="select", outcome="finished") == finished + 1
    assert metric(url, "oprm_chunks_per_request_count") == before["oprm_chunks_per_request_count"] + 1
    assert metric(url, "oprm_chunks_per_request_sum") == before["oprm_chunks_per_request_sum"] + 5
    assert metric(url, "oprm_aborted_chunks_total") == before["oprm_aborted_chunks_total"] + 4  # the losers
    chosen_entropy = out.oprm["entropies"][out.oprm["selected_chunk"]]
    added = metric(url, "oprm_selected_entropy_nats_sum") - before["oprm_selected_entropy_nats_sum"]
    assert added == pytest.approx(chosen_entropy, abs=1e-4)


def test_one_slot_while_decoding_and_disconnect_aborts(server):
    url = server[0]
    generated_before = metric(url, "vllm:generation_tokens_total")
    abandoned = metric(url, "oprm_requests_total", outcome="abandoned")
    # 10 ms a step: the full answer would take 20 s, the abort must come within its first 10
    paced = {PACE_KEY: 0.01}
    stream = complete(server, *layout(seed=13), max_tokens=MAX_MODEL_LEN - 64, stream=True, xargs=paced)
    for number, _ in enumerate(stream):
        if number == 2:  # selection made, the winner is decoding (the gauge follows engine steps: poll it)
            deadline = time.monotonic() + 5
            while metric(url, "vllm:num_requests_running") != 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert metric(url, "vllm:num_requests_running") == 1  # 5 chunks prefilled, 4 aborted
            break
    stream.close()  # the client goes away mid-request
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (
        metric(url, "vllm:num_requests_running") or metric(url, "oprm_requests_total", outcome="abandoned") == abandoned
    ):
        time.sleep(0.1)
    assert metric(url, "vllm:num_requests_running") == 0
    assert metric(url, "vllm:generation_tokens_total") - generated_before < MAX_MODEL_LEN // 2
    assert metric(url, "oprm_requests_total", outcome="abandoned") == abandoned + 1


BAD_REQUESTS = [
    ("no placeholder", {"prompt": "w1 w2"}, {}, "exactly once, found 0"),
    ("two placeholders", {"prompt": "{{context}} w1 {{context}}"}, {}, "exactly once, found 2"),
    ("prompt list", {"prompt": ["w1 {{context}}"]}, {}, "one string"),
    ("empty context", {}, {"context": ""}, "context is empty"),
    ("context of numbers", {}, {"context": [1, 2]}, "oprm.context must be"),
    ("zero chunk size", {}, {"chunk_size": 0}, "oprm.chunk_size must be a positive integer"),
    ("text chunk size", {}, {"chunk_size": "big"}, "oprm.chunk_size"),
    ("unknown mode", {}, {"mode": "vote"}, "oprm.mode must be one of"),
    ("two-token idk", {}, {"idk": "w1 w2"}, "exactly one token"),
    ("negative idk id", {}, {"idk": [-1]}, "oprm.idk"),
    ("idk number", {}, {"idk": 4}, "oprm.idk"),
    ("zero budget", {}, {"max_batch_tokens": 0}, "oprm.max_batch_tokens"),
    ("budget below one row", {}, {"max_batch_tokens": 5}, "max_batch_tokens"),
    ("unknown field", {}, {"chunks": 3}, "unknown field(s) chunks"),
    ("n > 1", {"n": 2}, {}, "n=2"),
    ("max_tokens past the model", {"max_tokens": MAX_MODEL_LEN}, {}, "max_model_len"),
    ("prefix too long", {"prompt": "w1 " * MAX_MODEL_LEN + "{{context}} w2"}, {}, "max_model_len"),
    ("echo", {"echo": True}, {}, "echo is not supported"),
    ("beam search", {"use_beam_search": True}, {}, "use_beam_search is not supported"),
    ("streaming, bad mode", {"stream": True}, {"mode": "vote"}, "oprm.mode"),
    ("1M-token context", {}, {"context": "w7 " * 1_000_000}, "over this server's limit of 256"),
    ("idk id outside the vocabulary", {}, {"idk": [10**6]}, "outside the vocabulary"),
    ("fractional budget", {}, {"max_batch_tokens": 1.5}, "oprm.max_batch_tokens"),
    ("context object", {}, {"context": {"text": "w1"}}, "oprm.context must be"),
    ("prompt of token ids", {"prompt": [5, 6, 7]}, {}, "one string"),
    ("negative temperature", {"temperature": -1.0}, {}, "temperature"),
    ("prefix cache on an engine without one", {}, {"prefix_cache": True}, "--enable-prefix-caching"),
    ("prefix cache as text", {}, {"prefix_cache": "yes"}, "oprm.prefix_cache must be true or false"),
    ("reserved capture key", {"vllm_xargs": {"oprm_capture": "mine"}}, {}, "'oprm_capture' is reserved"),
    ("negative early exit", {}, {"early_exit_entropy": -0.5}, "oprm.early_exit_entropy must be a finite number"),
    ("early exit as text", {}, {"early_exit_entropy": "low"}, "oprm.early_exit_entropy must be a finite number"),
    ("early exit in summarize", {}, {"early_exit_entropy": 1, "mode": "summarize"}, "does not apply to mode"),
    ("unknown chunk order", {}, {"chunk_order": "middle"}, "oprm.chunk_order must be one of"),
]


@pytest.mark.parametrize("name,request_fields,oprm_fields,message", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_completion_request_is_400(server, name, request_fields, oprm_fields, message):
    _, client, path, _ = server
    fields = dict(request_fields)
    stream = fields.pop("stream", False)
    body = {"prompt": "w1 {{context}} w2", **fields, "oprm": {"context": "w3 w4 w5", **oprm_fields}}
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=path, prompt="", max_tokens=4, stream=stream, extra_body=body)
    assert message in error.value.message


@pytest.mark.parametrize(
    "oprm,fields,message",
    [
        ("not an object", {}, "oprm must be an object"),
        ({"context": "w3"}, {"content": "w1 w2"}, "exactly once, found 0"),
        ({"context": "w3"}, {"n": 2}, "n=2"),
    ],
)
def test_bad_chat_request_is_400(server, oprm, fields, message):
    _, client, path, _ = server
    fields = dict(fields)
    content = fields.pop("content", "w1 {{context}} w2")
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(
            model=path, messages=[{"role": "user", "content": content}], max_tokens=4, **fields,
            extra_body={"oprm": oprm},
        )
    assert message in error.value.message


def post_raw(server, body: bytes):
    """The HTTPError of a hand-written body (the openai client cannot send these)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        server[0] + "/v1/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=30)
    return error.value


def test_non_utf8_body_is_400(server):
    assert post_raw(server, b'{"model": "m", "prompt": "w1 {{context}} \xff\xfe", "oprm": {"context": "w2"}}').code == 400


def test_nan_early_exit_threshold_is_400(server):
    body = f'{{"model": "{server[2]}", "prompt": "w1 {{{{context}}}} w2", "oprm": {{"context": "w3", "early_exit_entropy": NaN}}}}'
    error = post_raw(server, body.encode())
    assert error.code == 400 and "oprm.early_exit_entropy must be a finite number" in error.read().decode()


@pytest.mark.parametrize("chat", [False, True])
def test_plain_request_with_the_reserved_capture_key_is_400(server, chat):
    _, client, path, _ = server
    extra = {"vllm_xargs": {"oprm_capture": "mine"}}
    with pytest.raises(openai.BadRequestError) as error:
        if chat:
            client.chat.completions.create(
                model=path, messages=[{"role": "user", "content": "w1"}], max_tokens=2, extra_body=extra
            )
        else:
            client.completions.create(model=path, prompt="w1 w2", max_tokens=2, extra_body=extra)
    assert "'oprm_capture' is reserved" in error.value.message


def test_serving_goes_on_after_bad_requests(server):
    parts = layout(seed=17)
    out = complete(server, *parts)
    assert_matches(out.choices[0], out.oprm, reference(server, *parts))
    assert metric(server[0], "vllm:num_requests_running") == 0

