"""The engine the benchmark-harness tests (LongBench, LongBench v2) run on: a tiny Mamba2 through a
real ``OPRMLLM``, and a record of every prompt a runner sends it."""

import pytest


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    pytest.importorskip("vllm")
    from vllm_oprm import OPRMLLM
    from vllm_oprm.testing import build_model_dir

    path = str(tmp_path_factory.mktemp("mamba2"))
    build_model_dir("mamba2", path, seed=1)
    engine = OPRMLLM(model=path, dtype="float32", enforce_eager=True, max_model_len=512, max_num_seqs=16)
    yield engine
    engine.llm.llm_engine.engine_core.shutdown()


@pytest.fixture
def sent(llm, monkeypatch):
    """Every (prompt, OPRM config) the runner hands to the engine."""
    calls = []
    generate = llm.generate

    def recording(batch, *args, **kwargs):
        calls.extend((prompt, kwargs["oprm"]) for prompt in batch)
        return generate(batch, *args, **kwargs)

    monkeypatch.setattr(llm, "generate", recording)
    return calls
