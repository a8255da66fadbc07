"""OPRM behind one API server over two data-parallel engines (``--data-parallel-size 2``, CPU build).

vLLM balances requests over the engines one request at a time, so one OPRM request's chunk
rows land on both engines and each engine's worker holds the first-token records of the rows it
ran: the fan-out must collect them from every engine. Every answer is checked against the
reference backend, and no engine keeps a request (a state slot) afterwards. Both of vLLM's
data-parallel backends: "mp" (engine processes) and "ray" (engine actors on a local Ray with
4 logical CPUs, each running the Ray executor; ``patches/cpu_ray.py``).
"""

import contextlib
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

from vllm_oprm import OPRMConfig, OPRMPrompt  # noqa: E402
from vllm_oprm.reference import OPRMGenerator  # noqa: E402
from vllm_oprm.testing import build_model_dir, metric, oprm_server, same_words, words  # noqa: E402

# On CPU: vLLM 0.33 gives data-parallel rank r NUMA node r unless CPU_VISIBLE_MEMORY_NODES lists one per rank
# (this machine has one node), and each engine gets a core of its own (by default both bind core 0).
CPU_PLACEMENT = {"CPU_VISIBLE_MEMORY_NODES": "0,0", "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
CHUNK = 16
GREEDY = {"max_tokens": 8, "temperature": 0.0}
EXACT = {"ignore_eos": True, "return_token_ids": True}
ENGINE_ARGS = ("--dtype", "float32", "--enforce-eager", "--max-model-len", "1024", "--max-num-seqs", "8")


@contextlib.contextmanager
def local_ray(num_cpus):
    """A local Ray cluster of ``num_cpus`` logical CPUs; yields its address (for ``RAY_ADDRESS``)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module", params=["mp", "ray"])
def server(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("mamba2_dp"))
    model, tokenizer = build_model_dir("mamba2", path, seed=2)
    dp_args = ("--data-parallel-size", "2", "--data-parallel-backend", request.param)
    with contextlib.ExitStack() as stack:
        env = dict(CPU_PLACEMENT)
        if request.param == "ray":  # per rank: one CPU for the worker, one for the engine actor
            env["RAY_ADDRESS"] = stack.enter_context(local_ray(num_cpus=4))
        running = stack.enter_context(
            oprm_server(path, *ENGINE_ARGS, *dp_args, "--oprm-chunk-size", str(CHUNK), timeout_s=600, env=env)
        )
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
        yield running.url, client, path, OPRMGenerator(model, tokenizer)
        assert metric(running.url, "vllm:num_requests_running") == 0  # summed over both engines
        assert metric(running.url, "vllm:num_requests_waiting") == 0


def parts(seed):
    rng = torch.Generator().manual_seed(seed)
    return words(rng, 5), words(rng, 70), words(rng, 4)


def test_oprm_requests_over_two_engines_equal_reference(server):
    url, client, path, generator = server
    jobs = [(seed, mode) for seed, mode in zip(range(40, 46), ["select", "summarize", "select", "last", "select", "summarize"])]
    plain = [" ".join(parts(seed)) for seed in range(50, 53)]
    expected_plain = [client.completions.create(model=path, prompt=p, **GREEDY, extra_body=EXACT).choices[0].token_ids for p in plain]
    prompt_tokens = {engine: metric(url, "vllm:prompt_tokens_total", engine=engine) for engine in ("0", "1")}

    def run_oprm(job):
        prefix, context, suffix = parts(job[0])
        extra = {**EXACT, "oprm": {"context": context, "mode": job[1]}}
        return client.completions.create(model=path, prompt=f"{prefix} {{{{context}}}} {suffix}", **GREEDY, extra_body=extra)

    def run_plain(prompt):
        return client.completions.create(model=path, prompt=prompt, **GREEDY, extra_body=EXACT).choices[0].token_ids

    with ThreadPoolExecutor(len(jobs) + len(plain)) as pool:
        oprm_futures = [pool.submit(run_oprm, job) for job in jobs]
        plain_futures = [pool.submit(run_plain, p) for p in plain]
        for (seed, mode), future in zip(jobs, oprm_futures):
            out = future.result()
            config = OPRMConfig(chunk_size=CHUNK, mode=mode)
            ref = generator.generate(OPRMPrompt(*parts(seed)), config, max_new_tokens=GREEDY["max_tokens"], eos_token_id=-1)
            choice = out.choices[0]
            assert choice.token_ids == ref.token_ids
            assert same_words(choice.text, ref.text)
            assert ref.num_chunks == (1 if mode == "last" else 5)
            assert (out.oprm["num_chunks"], out.oprm["selected_chunk"]) == (ref.num_chunks, ref.selected_chunk)
            assert out.oprm["entropies"] == pytest.approx(ref.entropies, abs=1e-4)
        assert [f.result() for f in plain_futures] == expected_plain
    # Both engines prefilled chunk rows (so the records really came from two engines).
    for engine, before in prompt_tokens.items():
        assert metric(url, "vllm:prompt_tokens_total", engine=engine) > before + 5 * CHUNK


def test_ray_backend_with_too_few_ray_cpus_fails_fast(monkeypatch):
    """Each rank needs world_size + 1 Ray CPUs; vLLM counts world_size and would wait for ever."""
    from types import SimpleNamespace

    pytest.importorskip("ray")
    from ray._private import state
    from vllm.v1.engine.utils import CoreEngineActorManager

    from vllm_oprm.patches import cpu_ray

    cpu_ray.apply()  # what the plugin does in the API server process
    monkeypatch.setattr(state, "available_resources_per_node", lambda: {"n1": {"CPU": 2.0, "node:10.0.0.1": 1.0}})
    parallel = SimpleNamespace(data_parallel_size_local=2, world_size=1, data_parallel_master_ip="10.0.0.1")
    with pytest.raises(ValueError, match=r"needs 4 Ray CPUs on 10\.0\.0\.1 .*found 2 available.*--num-cpus 4"):
        CoreEngineActorManager.create_dp_placement_groups(SimpleNamespace(parallel_config=parallel))
