"""The model classes the plugin adds to vLLM (`vllm_oprm/models/`) against their references:
RWKV6 and RWKV7 against the torch references, RecurrentGemma against transformers."""

import pytest
import torch

pytest.importorskip("vllm")

from vllm import SamplingParams  # noqa: E402
from vllm.config import CompilationMode  # noqa: E402

from vllm_oprm.testing import build_model_dir, words  # noqa: E402

STEPS = 24  # past RecurrentGemma's 16-token attention window


@pytest.fixture(scope="module", params=["recurrent_gemma", "rwkv6", "rwkv7"])
def engine_and_reference(request, tmp_path_factory):
    from vllm import LLM

    path = str(tmp_path_factory.mktemp(request.param))
    model, tokenizer = build_model_dir(request.param, path, seed=3)
    patch = pytest.MonkeyPatch()
    patch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model pickles a function to the worker
    patch.setenv("VLLM_CPU_CI_ENV", "0")  # CI traces other engines only; these compile with Inductor
    # A 64-token step budget splits the longer prompts over several steps (chunked prefill). vLLM's
    # default settings: the classes run compiled, and RecurrentGemma (a hybrid) with prefix caching on.
    llm = LLM(model=path, dtype="float32", max_model_len=512, max_num_seqs=8, max_num_batched_tokens=64)
    config = llm.llm_engine.vllm_config
    assert not config.model_config.enforce_eager
    assert config.cache_config.enable_prefix_caching == (request.param == "recurrent_gemma")
    assert config.compilation_config.mode != CompilationMode.NONE and config.compilation_config.backend == "inductor"
    yield llm, model, tokenizer
    llm.llm_engine.engine_core.shutdown()
    patch.undo()


def reference_greedy(model, ids: list[int]) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the first token's log-probabilities, straight from the reference."""
    with torch.no_grad():
        if hasattr(model, "backbone"):  # the torch RWKV6 and RWKV7: carry their state by hand
            logits, state = model(torch.tensor([ids]))
            first = torch.log_softmax(logits[0, -1], dim=-1)
            tokens = [int(logits[0, -1].argmax())]
            for _ in range(STEPS - 1):
                logits, state = model(torch.tensor([[tokens[-1]]]), state)
                tokens.append(int(logits[0, -1].argmax()))
            return tokens, first
        # use_cache=False also clears the state transformers keeps on the modules between calls
        first = torch.log_softmax(model(torch.tensor([ids]), use_cache=False).logits[0, -1].float(), dim=-1)
        out = model.generate(torch.tensor([ids]), max_new_tokens=STEPS, do_sample=False, eos_token_id=None, pad_token_id=0)
        return out[0, len(ids) :].tolist(), first


def assert_equals_reference(llm, model, prompts: list[list[int]]) -> None:
    """In one batch: greedy tokens and the first token's top-5 logprobs (1e-4) == the reference's."""
    params = SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True, logprobs=5)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
    for ids, out in zip(prompts, outs, strict=True):
        tokens, first = reference_greedy(model, ids)
        completion = out.outputs[0]
        assert list(completion.token_ids) == tokens
        for token_id, logprob in completion.logprobs[0].items():
            assert logprob.logprob == pytest.approx(first[token_id].item(), abs=1e-4)


def test_greedy_and_first_token_logprobs_equal_the_reference(engine_and_reference):
    llm, model, tokenizer = engine_and_reference
    rng = torch.Generator().manual_seed(0)
    # A one-token prompt (scheduled like a decode, from a fresh state), short ones, longer ones.
    prompts = [[7]] + [tokenizer.encode(words(rng, n)) for n in (5, 40, 150, 300)]
    assert_equals_reference(llm, model, prompts)  # all in one batch: decodes next to prefills



def poison_states(model) -> int:
    """Fill every recurrent-state slot with NaN (what a reused slot could hold); returns the tensors filled."""
    from vllm_oprm.models.state_cache import RecurrentStateLayer

    filled = [
        state.fill_(float("nan")) for layer in model.modules() if isinstance(layer, RecurrentStateLayer) for state in layer.kv_cache
    ]
    return len(filled)


def test_new_requests_ignore_whatever_their_state_slots_held(engine_and_reference):
    llm, model, tokenizer = engine_and_reference
    assert all(filled > 0 for filled in llm.apply_model(poison_states))
    rng = torch.Generator().manual_seed(2)
    prompts = [[9], tokenizer.encode(words(rng, 30))]  # a one-token prompt runs as a decode
    params = SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True)
    for ids, out in zip(prompts, llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)):
        assert list(out.outputs[0].token_ids) == reference_greedy(model, ids)[0]


def rwkv6_partition_sizes(model) -> list[int]:
    """On each rank: a channel mix's key outputs and value inputs, the head's vocabulary rows, a time mix's
    key outputs and output inputs, its heads in the WKV state (vLLM's CPU linears repack their weights, so
    sizes come from the layers)."""
    block = model.rwkv.blocks[0]
    return [block.feed_forward.key.output_size_per_partition, block.feed_forward.value.input_size_per_partition,
            model.head.weight.shape[0], block.attention.key.output_size_per_partition,
            block.attention.output.input_size_per_partition, block.get_state_shape()[0][0]]


def rwkv7_partition_sizes(model) -> list[int]:
    """On each rank: a channel mix's key outputs and value inputs, the head's vocabulary rows, a time mix's
    key outputs, output inputs and decay LoRA outputs, its heads in the WKV state."""
    block = model.model.layers[1]
    attn = block.attn
    return [block.ffn.key.output_size_per_partition, block.ffn.value.input_size_per_partition,
            model.lm_head.weight.shape[0], attn.k_proj.output_size_per_partition,
            attn.o_proj.input_size_per_partition, attn.w_lora.lora["2"].output_size_per_partition,
            block.get_state_shape()[0][0]]


def recurrent_gemma_partition_sizes(model) -> list[int]:
    """On each rank: the embedding's vocabulary rows, a recurrent block's x-branch outputs, conv channels,
    RG-LRU gate heads and state width, the attention's query heads and key/value heads, the MLP's outputs."""
    recurrent, attention = model.model.layers[0].temporal_block, model.model.layers[2].temporal_block
    return [model.model.embed_tokens.weight.shape[0], recurrent.linear_x.output_size_per_partition,
            recurrent.conv_1d.weight.shape[0], recurrent.rg_lru.input_gate_weight.shape[0],
            recurrent.get_state_shape()[0][0], attention.attn.num_heads, attention.attn.num_kv_heads,
            model.model.layers[0].mlp_block.gate_up_proj.output_size_per_partition]


@pytest.mark.parametrize("family", ["rwkv6", "rwkv7", "recurrent_gemma"])
def test_tensor_parallel_2_shards_the_model_and_equals_the_reference(family, tmp_path, monkeypatch):
    from vllm import LLM

    model, tokenizer = build_model_dir(family, str(tmp_path), seed=3)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per rank: the CPU worker cannot pick two here
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model pickles a function to the workers
    llm = LLM(model=str(tmp_path), dtype="float32", max_model_len=512, max_num_seqs=8, max_num_batched_tokens=64,
              tensor_parallel_size=2)  # compiled (traced only where CI sets VLLM_CPU_CI_ENV=1)
    try:
        c = model.config
        half_vocab = -(-c.vocab_size // 64) * 64 // 2  # vLLM pads the vocabulary to 64 before splitting it
        if family == "rwkv6":
            inner, attn = c.intermediate_size // 2, c.attention_hidden_size // 2
            expected = [inner, inner, half_vocab, attn, attn, c.num_heads // 2]
            sizes = llm.apply_model(rwkv6_partition_sizes)
        elif family == "rwkv7":
            inner, hidden = c.intermediate_size // 2, c.hidden_size // 2
            expected = [inner, inner, half_vocab, hidden, hidden, hidden, c.num_heads // 2]
            sizes = llm.apply_model(rwkv7_partition_sizes)
        else:  # the one key/value head is replicated on both ranks
            lru = c.lru_width // 2
            expected = [half_vocab, lru, lru, c.num_attention_heads // 2, lru, c.num_attention_heads // 2, 1,
                        c.intermediate_size // 2]
            sizes = llm.apply_model(recurrent_gemma_partition_sizes)
        assert sizes == [expected] * 2
        rng = torch.Generator().manual_seed(1)
        prompts = [[7]] + [tokenizer.encode(words(rng, n)) for n in (5, 150)]
        assert_equals_reference(llm, model, prompts)
    finally:
        llm.llm_engine.engine_core.shutdown()


def test_rwkv7_checkpoint_with_stacked_token_shift_mixes_loads_the_same(tmp_path):
    """fla's first RWKV7 format: each time mix's six token-shift mixes stacked in one ``attn.x_x``. fla's init
    makes the six alike, so they are redrawn apart first (the reference reads them from the split names)."""
    from safetensors.torch import load_file, save_file
    from vllm import LLM

    from vllm_oprm.reference.rwkv7 import Rwkv7ForCausalLM

    _, tokenizer = build_model_dir("rwkv7", str(tmp_path), seed=3)
    (file,) = tmp_path.glob("*.safetensors")
    weights = load_file(file)
    mixes = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")  # x_x's rows, as fla 0.6's load_state_dict reads them
    rng = torch.Generator().manual_seed(5)
    stacked = {}
    for name in [name for name in weights if name.endswith(".attn.x_r")]:
        attn = name.removesuffix(".x_r")
        for mix in mixes:
            weights[f"{attn}.{mix}"] = torch.rand(weights[name].shape, generator=rng)
        stacked[f"{attn}.x_x"] = torch.stack([weights[f"{attn}.{mix}"].flatten() for mix in mixes])
    assert stacked
    save_file(weights, file, metadata={"format": "pt"})
    model = Rwkv7ForCausalLM.from_pretrained(str(tmp_path))
    split = {f"{name.removesuffix('.x_x')}.{mix}" for name in stacked for mix in mixes}
    weights = {name: tensor for name, tensor in weights.items() if name not in split}
    save_file(weights | stacked, file, metadata={"format": "pt"})
    llm = LLM(model=str(tmp_path), dtype="float32", max_model_len=512, max_num_seqs=8, enforce_eager=True,
              enable_prefix_caching=False)
    try:
        assert_equals_reference(llm, model, [tokenizer.encode(words(torch.Generator().manual_seed(4), 40))])
    finally:
        llm.llm_engine.engine_core.shutdown()


def state_dtypes(model) -> list[tuple[str, ...]]:
    """Per recurrent layer, the dtype of each of its states, in the block's state order."""
    from vllm_oprm.models.state_cache import RecurrentStateLayer

    return sorted({tuple(str(state.dtype) for state in layer.kv_cache) for layer in model.modules()
                   if isinstance(layer, RecurrentStateLayer)})


@pytest.mark.parametrize("family", ["rwkv6", "rwkv7", "recurrent_gemma"])
def test_bfloat16_keeps_the_recurrent_state_in_fp32_and_stays_near_the_fp32_reference(family, tmp_path, monkeypatch):
    """bf16 weights and activations, fp32 WKV / RG-LRU state (the first of a block's states; the token-shift
    and conv windows are activations, kept in bf16). On these tiny models bf16's first-token logprobs were
    within 0.073 nats of the fp32 reference (RecurrentGemma; 0.045 RWKV7, 0.022 RWKV6), their top five spread
    over 1-2 nats: the bound is twice the largest error seen."""
    from vllm import LLM

    model, tokenizer = build_model_dir(family, str(tmp_path), seed=3)
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model pickles a function to the worker
    llm = LLM(model=str(tmp_path), dtype="bfloat16", max_model_len=512, max_num_seqs=8, max_num_batched_tokens=64,
              enforce_eager=True, enable_prefix_caching=False)
    try:
        states = llm.apply_model(state_dtypes)[0]
        assert {dtypes[0] for dtypes in states} == {"torch.float32"}
        assert {dtype for dtypes in states for dtype in dtypes[1:]} == {"torch.bfloat16"}
        rng = torch.Generator().manual_seed(0)
        prompts = [[7]] + [tokenizer.encode(words(rng, n)) for n in (5, 40, 150, 300)]
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, logprobs=5)
        for ids, out in zip(prompts, llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)):
            first = reference_greedy(model, ids)[1]
            for token_id, logprob in out.outputs[0].logprobs[0].items():
                assert logprob.logprob == pytest.approx(first[token_id].item(), abs=0.15)
    finally:
        llm.llm_engine.engine_core.shutdown()
