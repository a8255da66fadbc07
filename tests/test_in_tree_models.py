"""OPRM on vLLM's own hybrid and recurrent model classes, and a transformer as the control.

No plugin code runs these models: vLLM's in-tree classes do, and the reference is the
generic exact backend (each row alone, the whole sequence re-run at every step).
"""

import pytest

pytest.importorskip("vllm")

from vllm import SamplingParams  # noqa: E402

from vllm_oprm import OPRMConfig  # noqa: E402
from vllm_oprm.reference import OPRMGenerator  # noqa: E402

from in_tree_models import TINY_CONFIGS, build_in_tree_model_dir  # noqa: E402
from reference_checks import assert_same_as_reference, prompts  # noqa: E402

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module", params=list(TINY_CONFIGS))
def in_tree(request, tmp_path_factory):
    """An engine on vLLM's class for the architecture, and the reference on the transformers model."""
    from vllm_oprm import OPRMLLM

    path = str(tmp_path_factory.mktemp(request.param))
    model, tokenizer = build_in_tree_model_dir(request.param, path)
    engine = OPRMLLM(model=path, dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=8)
    yield engine, OPRMGenerator(model, tokenizer)
    engine.llm.llm_engine.engine_core.shutdown()  # free the CPU before the next architecture's engine


@pytest.mark.parametrize("mode, budget", [("select", 100_000), ("select", 40), ("summarize", 100_000), ("last", 100_000)])
def test_oprm_equals_reference(in_tree, mode, budget):
    llm, reference = in_tree
    config = OPRMConfig(chunk_size=16, mode=mode, max_batch_tokens=budget, summary_separator=" | ")
    batch = prompts(seed=3, count=2, context_words=40)
    outs = llm.generate(batch, GREEDY, oprm=config, use_tqdm=False)
    for prompt, out in zip(batch, outs):
        ref = reference.generate(prompt, config, max_new_tokens=GREEDY.max_tokens, eos_token_id=-1)
        assert ref.num_chunks == (1 if mode == "last" else 3)  # "last" keeps the last chunk only
        if mode == "select":
            assert_same_as_reference(out, ref)
        else:  # every chunk's answer in chunk order (summarize), or the last chunk's
            assert out.outputs[0].token_ids == ref.token_ids
            assert (out.oprm.num_chunks, out.oprm.selected_chunk) == (ref.num_chunks, ref.selected_chunk)


def test_single_chunk_equals_vanilla_and_reference(in_tree):
    llm, reference = in_tree
    prompt = prompts(seed=4, count=1, context_words=12)[0]
    config = OPRMConfig(chunk_size=16)
    out = llm.generate([prompt], GREEDY, oprm=config, use_tqdm=False)[0]
    vanilla_ids = prompt.tokenize(llm.tokenizer).vanilla_ids
    vanilla = llm.generate([{"prompt_token_ids": vanilla_ids}], GREEDY, use_tqdm=False)[0]
    ref = reference.generate(vanilla_ids, max_new_tokens=GREEDY.max_tokens, eos_token_id=-1)
    assert out.oprm.num_chunks == 1
    assert out.outputs[0].token_ids == vanilla.outputs[0].token_ids == ref.token_ids
