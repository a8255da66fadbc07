"""OPRM on vLLM's Ray executor with tensor parallelism 2, on CPU (`patches/cpu_ray.py`):
offline and through the server, against the reference backend."""

import pytest
import torch

pytest.importorskip("vllm")
pytest.importorskip("ray")
openai = pytest.importorskip("openai")

from vllm import SamplingParams  # noqa: E402

from vllm_oprm import OPRMConfig, OPRMPrompt  # noqa: E402
from vllm_oprm.reference import OPRMGenerator  # noqa: E402
from vllm_oprm.testing import build_model_dir, metric, oprm_server, same_words, words  # noqa: E402

from vllm_oprm.patches import cpu_ray, vllm_release  # noqa: E402

pytestmark = pytest.mark.skipif(
    vllm_release() not in cpu_ray.TARGET_VLLM,
    reason=f"patches/cpu_ray.py (Ray executor on CPU) targets vLLM {cpu_ray.TARGET_VLLM} only",
)

RAY_TP2 = {"distributed_executor_backend": "ray", "tensor_parallel_size": 2}
CONFIG = OPRMConfig(chunk_size=16, max_batch_tokens=60)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("mamba2"))
    model, tokenizer = build_model_dir("mamba2", path, seed=5)
    return path, OPRMGenerator(model, tokenizer)


def prompts(seed):
    rng = torch.Generator().manual_seed(seed)
    return [(words(rng, 4), words(rng, 60), words(rng, 3)) for _ in range(3)]


def test_offline_oprm_on_ray_tp2_equals_reference(model_dir):
    from vllm_oprm import OPRMLLM

    path, reference = model_dir
    llm = OPRMLLM(model=path, dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=8, **RAY_TP2)
    try:
        assert llm.engine.vllm_config.parallel_config.distributed_executor_backend == "ray"
        batch = [OPRMPrompt(*parts) for parts in prompts(1)]
        outs = llm.generate(batch, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True), oprm=CONFIG, use_tqdm=False)
        for prompt, out in zip(batch, outs):
            ref = reference.generate(prompt, CONFIG, max_new_tokens=6, eos_token_id=-1)
            assert list(out.outputs[0].token_ids) == ref.token_ids
            assert (out.oprm.num_chunks, out.oprm.selected_chunk) == (ref.num_chunks, ref.selected_chunk)
            assert out.oprm.entropies == pytest.approx(ref.entropies, abs=1e-4)
    finally:
        llm.llm.llm_engine.engine_core.shutdown()


def test_server_oprm_on_ray_tp2_equals_reference(model_dir):
    path, reference = model_dir
    args = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "256", "--max-num-seqs", "8",
            "--distributed-executor-backend", "ray", "--tensor-parallel-size", "2"]
    with oprm_server(path, *args) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        for prefix, context, suffix in prompts(2):
            out = client.completions.create(
                model=path, prompt=f"{prefix} {{{{context}}}} {suffix}", max_tokens=6, temperature=0.0,
                extra_body={"ignore_eos": True, "oprm": {"context": context, "chunk_size": 16, "max_batch_tokens": 60}},
            )
            ref = reference.generate(OPRMPrompt(prefix, context, suffix), CONFIG, max_new_tokens=6, eos_token_id=-1)
            assert same_words(out.choices[0].text, ref.text)
            assert out.oprm["selected_chunk"] == ref.selected_chunk
        assert metric(server.url, "vllm:num_requests_running") == 0
