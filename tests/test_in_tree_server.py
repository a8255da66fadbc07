"""OPRM through `vllm-oprm serve` on vLLM's own Falcon-H1 class (a hybrid): the served answer is the
reference's in every mode, and a context of one chunk is served exactly as vanilla."""

import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

from vllm_oprm.reference import OPRMGenerator  # noqa: E402
from vllm_oprm.testing import oprm_server  # noqa: E402

from in_tree_models import build_in_tree_model_dir  # noqa: E402
from reference_checks import (  # noqa: E402
    CHUNK, assert_served_mode_equals_reference, assert_served_select_equals_reference,
    assert_served_single_chunk_equals_vanilla,
)


@pytest.fixture(scope="module", params=["falcon_h1"])  # the offline matrix has the rest
def server(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(request.param))
    model, tokenizer = build_in_tree_model_dir(request.param, path)
    args = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "256", "--max-num-seqs", "8",
            "--oprm-chunk-size", str(CHUNK)]
    with oprm_server(path, *args) as running:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
        yield running.url, client, path, OPRMGenerator(model, tokenizer)


@pytest.mark.parametrize("budget", [40, 100_000])  # one row per batch, all rows in one
def test_served_select_equals_reference(server, budget):
    assert_served_select_equals_reference(server, budget, context_words=40, num_chunks=3)


@pytest.mark.parametrize("mode", ["summarize", "last"])
def test_served_modes_equal_reference(server, mode):
    assert_served_mode_equals_reference(server, mode, context_words=40)


def test_served_single_chunk_equals_vanilla(server):
    assert_served_single_chunk_equals_vanilla(server)
