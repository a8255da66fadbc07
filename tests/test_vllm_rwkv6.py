"""RWKV6 as a vLLM model class (`vllm_oprm/models/rwkv6.py`) against the torch reference."""

import pytest
import torch

pytest.importorskip("vllm")

from vllm import SamplingParams  # noqa: E402

from vllm_oprm.testing import build_model_dir, words  # noqa: E402


@pytest.fixture(scope="module")
def engine_and_reference(tmp_path_factory):
    from vllm import LLM

    from vllm_oprm.engine.capture import pin_v1_model_runner

    path = str(tmp_path_factory.mktemp("rwkv6"))
    model, tokenizer = build_model_dir("rwkv6", path, seed=3)
    pin_v1_model_runner()
    # A 64-token step budget splits the longer prompts over several steps (chunked prefill).
    llm = LLM(model=path, dtype="float32", enforce_eager=True, max_model_len=512, max_num_seqs=8,
              max_num_batched_tokens=64)
    yield llm, model, tokenizer
    llm.llm_engine.engine_core.shutdown()


def test_greedy_and_first_token_logprobs_equal_the_reference(engine_and_reference):
    llm, model, tokenizer = engine_and_reference
    rng = torch.Generator().manual_seed(0)
    # A one-token prompt (scheduled like a decode, from a fresh state), short ones, two chunked ones.
    prompts = [[7]] + [tokenizer.encode(words(rng, n)) for n in (5, 40, 150, 300)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=5)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
    for ids, out in zip(prompts, outs):  # all in one batch: decodes next to prefills
        with torch.no_grad():
            logits, state = model(torch.tensor([ids]))
            expected = [int(logits[0, -1].argmax())]
            first = torch.log_softmax(logits[0, -1], dim=-1)
            for _ in range(11):
                logits, state = model(torch.tensor([[expected[-1]]]), state)
                expected.append(int(logits[0, -1].argmax()))
        completion = out.outputs[0]
        assert list(completion.token_ids) == expected
        for token_id, logprob in completion.logprobs[0].items():
            assert logprob.logprob == pytest.approx(first[token_id].item(), abs=1e-4)
