"""Two `vllm-oprm serve` replicas behind one Ray Serve endpoint (local Ray, CPU), with the `openai` client."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("vllm")
ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

from vllm_oprm import OPRMConfig, OPRMPrompt  # noqa: E402
from vllm_oprm.reference import OPRMGenerator  # noqa: E402
from vllm_oprm.testing import build_model_dir, metric, same_words, words  # noqa: E402

SERVER_ARGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "512", "--max-num-seqs", "16",
               "--oprm-chunk-size", "16"]


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    from ray import serve

    from vllm_oprm.entrypoints.local_server import free_port
    from vllm_oprm.entrypoints.ray_serve import deploy

    path = str(tmp_path_factory.mktemp("mamba2"))
    model, tokenizer = build_model_dir("mamba2", path, seed=5)
    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        url = deploy(path, SERVER_ARGS, replicas=2, port=port, num_cpus=1)
        yield url, path, OPRMGenerator(model, tokenizer)
    finally:
        serve.shutdown()
        ray.shutdown()


def ask(endpoint, seed, **extra):
    url, path, _ = endpoint
    rng = torch.Generator().manual_seed(seed)
    prefix, context, suffix = words(rng, 5), words(rng, 60), words(rng, 4)
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    response = client.completions.with_raw_response.create(
        model=path, prompt=f"{prefix} {{{{context}}}} {suffix}", max_tokens=8, temperature=0.0,
        extra_body={"ignore_eos": True, "return_token_ids": True, "oprm": {"context": context}, **extra},
    )
    return OPRMPrompt(prefix, context, suffix), response.headers["x-oprm-replica"], response.parse()


def test_requests_spread_over_both_replicas_and_equal_the_reference(endpoint):
    """Waves of 16 concurrent requests until both replicas have answered (Ray Serve's router picks by its
    view of the queues, which can send one whole wave to one replica), at most 4 waves."""
    answers = []
    with ThreadPoolExecutor(16) as pool:
        for wave in range(4):
            answers += pool.map(lambda seed: ask(endpoint, seed), range(16 * wave, 16 * (wave + 1)))
            if len({replica for _, replica, _ in answers}) == 2:
                break
    reference = endpoint[2]
    for prompt, _, completion in answers:
        want = reference.generate(prompt, OPRMConfig(chunk_size=16), max_new_tokens=8, eos_token_id=-1)
        assert completion.choices[0].token_ids == want.token_ids
        assert same_words(completion.choices[0].text, want.text)
        assert completion.model_extra["oprm"]["selected_chunk"] == want.selected_chunk
    assert len({replica for _, replica, _ in answers}) == 2


def test_streaming_and_errors_pass_through(endpoint):
    url, path, reference = endpoint
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    rng = torch.Generator().manual_seed(99)
    prefix, context, suffix = words(rng, 5), words(rng, 60), words(rng, 4)
    stream = client.completions.create(
        model=path, prompt=f"{prefix} {{{{context}}}} {suffix}", max_tokens=8, temperature=0.0, stream=True,
        extra_body={"ignore_eos": True, "oprm": {"context": context}},
    )
    events = list(stream)
    want = reference.generate(OPRMPrompt(prefix, context, suffix), OPRMConfig(chunk_size=16), max_new_tokens=8,
                              eos_token_id=-1)
    assert same_words("".join(e.choices[0].text for e in events if e.choices), want.text)
    assert events[-1].model_extra["oprm"]["selected_chunk"] == want.selected_chunk
    with pytest.raises(openai.BadRequestError, match="oprm.chunk_size must be a positive integer"):
        client.completions.create(model=path, prompt="w1 {{context}} w2", max_tokens=4,
                                  extra_body={"oprm": {"context": "w3", "chunk_size": 0}})
    assert metric(url, "vllm:num_requests_running") == 0  # served by whichever replica answers /metrics
