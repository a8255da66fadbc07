"""vLLM's prefix cache of Mamba2, Mamba1 (Falcon-Mamba), RWKV6, RecurrentGemma and RWKV7 states under OPRM (CPU build,
patched), checked against engines without it.

Cache hits are read from vLLM's per-request ``num_cached_tokens`` offline (two engines in one
process share one Prometheus registry) and from the server's ``vllm:prefix_cache_hits_total``.
"""

import pytest
import torch

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

from vllm import SamplingParams  # noqa: E402

from vllm_oprm import OPRMConfig, OPRMPrompt  # noqa: E402
from vllm_oprm.core import aligned_chunk_size  # noqa: E402
from vllm_oprm.testing import build_model_dir, metric, oprm_server, words  # noqa: E402
from families import families  # noqa: E402

BLOCK = 32  # vLLM's --block-size: where states are cached
CACHED_FAMILIES = pytest.mark.parametrize(
    "model_dir", families("mamba2", "falcon_mamba", "rwkv6", "recurrent_gemma", "rwkv7"), indirect=True
)
MAMBA2 = pytest.mark.parametrize("model_dir", families("mamba2"), indirect=True)
CHUNK = 64
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
ENGINE = dict(dtype="float32", enforce_eager=True, max_model_len=1024, max_num_seqs=16)


# -- the patch's scan and checkpoint store, against the unpatched CPU kernel --------------------------


def scan_inputs(lengths, chunk=8, nheads=2, headdim=4, dstate=3, seed=0):
    """A varlen batch as vLLM's Mamba2 metadata lays it out: chunks of ``chunk`` tokens per sequence."""
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    x = torch.randn(total, nheads, headdim, generator=g)
    dt = torch.randn(total, nheads, generator=g)
    A = -torch.rand(nheads, generator=g) - 0.5
    B, C = torch.randn(2, total, 1, dstate, generator=g)
    D, dt_bias = torch.randn(nheads, generator=g), torch.randn(nheads, generator=g)
    initial = torch.randn(len(lengths), nheads, headdim, dstate, generator=g)
    starts = [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    bounds, owners, last = [0], [], []
    for seq, (start, end) in enumerate(zip(starts[:-1], starts[1:])):
        for cut in list(range(start + chunk, end, chunk)) + [end]:
            bounds.append(cut)
            owners.append(seq)
        last.append(len(owners) - 1)
    meta = dict(
        cu_seqlens=torch.tensor(starts, dtype=torch.int32), cu_chunk_seqlens=torch.tensor(bounds, dtype=torch.int32),
        seq_idx=torch.tensor(owners, dtype=torch.int32), last_chunk_indices=torch.tensor(last),
    )
    return (x, dt, A, B, C), dict(D=D, dt_bias=dt_bias, dt_softplus=True), initial, meta


def test_patched_scan_returns_the_state_after_every_chunk():
    from vllm.model_executor.layers.mamba.ops.cpu.mamba_ssm import _mamba_chunk_scan_combined_fwd_cpu as cpu_scan

    from vllm_oprm.patches.cpu_mamba2_checkpoints import chunk_states_scan

    lengths = [21, 8, 13]
    (x, dt, A, B, C), extra, initial, meta = scan_inputs(lengths)
    out_plain, out_patched = torch.empty_like(x), torch.empty_like(x)
    final = cpu_scan(x, dt, A, B, C, 8, out_plain, initial_states=initial, **extra, **meta)
    states = chunk_states_scan(cpu_scan)(
        x, dt, A, B, C, 8, out_patched, initial_states=initial, return_intermediate_states=True, **extra, **meta
    )
    torch.testing.assert_close(out_patched, out_plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(states[meta["last_chunk_indices"]], final, atol=1e-5, rtol=1e-5)
    # The obviously-correct twin: each chunk's state is the final state of the sequence cut at the chunk's end.
    bounds, owners, starts = meta["cu_chunk_seqlens"].tolist(), meta["seq_idx"].tolist(), meta["cu_seqlens"].tolist()
    for chunk, (end, seq) in enumerate(zip(bounds[1:], owners)):
        start = starts[seq]
        cut = [t[start:end] for t in (x, dt, B, C)]
        one = dict(cu_seqlens=torch.tensor([0, end - start], dtype=torch.int32), seq_idx=torch.zeros(1, dtype=torch.int32),
                   cu_chunk_seqlens=torch.tensor([0, end - start], dtype=torch.int32), last_chunk_indices=torch.tensor([0]))
        expected = cpu_scan(cut[0], cut[1], A, cut[2], cut[3], 8, torch.empty_like(cut[0]),
                            initial_states=initial[seq : seq + 1], **extra, **one)
        torch.testing.assert_close(states[chunk], expected[0], atol=1e-5, rtol=1e-5)


def test_torch_checkpoint_store_writes_conv_window_and_chunk_state():
    from types import SimpleNamespace

    from vllm_oprm.patches.cpu_mamba2_checkpoints import store_prefill_checkpoint_torch

    x = torch.arange(3 * 20, dtype=torch.float32).reshape(3, 20)  # (dim, tokens)
    conv_state, ssm_state = torch.zeros(5, 3, 4), torch.zeros(5, 2, 2)
    chunk_states = torch.arange(4 * 4, dtype=torch.float32).reshape(4, 2, 2)
    checkpoint = SimpleNamespace(checkpoint_offsets=torch.tensor([6, 0]), state_indices=torch.tensor([3, 1]))
    store_prefill_checkpoint_torch(checkpoint, torch.tensor([2, 0]), x, conv_state, chunk_states, ssm_state,
                                   torch.tensor([4, 12]), state_len=3)
    assert torch.equal(conv_state[3, :, :3], x[:, 7:10])  # row 0 starts at 4, checkpoint after 6 tokens
    assert torch.equal(conv_state[3, :, 3], torch.zeros(3))
    assert torch.equal(ssm_state[3], chunk_states[2])
    assert conv_state[[0, 1, 2, 4]].abs().sum() == 0 and ssm_state[[0, 1, 2, 4]].abs().sum() == 0  # row 1: none


# -- through real engines: one with the prefix cache, one without -------------------------------------


@pytest.fixture(scope="module")
def model_dir(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(request.param))
    build_model_dir(request.param, path, seed=1)
    return path


@pytest.fixture(scope="module")
def engines(model_dir):
    from vllm_oprm import OPRMLLM

    cached = OPRMLLM(model=model_dir, enable_prefix_caching=True, block_size=BLOCK, **ENGINE)
    plain = OPRMLLM(model=model_dir, enable_prefix_caching=False, **ENGINE)  # vLLM turns it on for hybrids
    yield cached, plain
    for engine in (cached, plain):
        engine.llm.llm_engine.engine_core.shutdown()


@CACHED_FAMILIES
def test_cached_engine_gives_the_logprobs_of_an_uncached_one(engines):
    """Prompts that span several blocks and share prefixes: the patched align-mode path gives the
    same greedy tokens and top-5 logprobs as an engine without prefix caching, and hits the cache."""
    cached, plain = engines
    rng = torch.Generator().manual_seed(3)
    shared = torch.randint(10, 250, (200,), generator=rng).tolist()
    tails = [torch.randint(10, 250, (n,), generator=rng).tolist() for n in (5, 40, 70)]
    prompts = [{"prompt_token_ids": shared + tail} for tail in tails]
    params = SamplingParams(max_tokens=6, temperature=0.0, logprobs=5, ignore_eos=True)
    for prompt in prompts:  # one by one, so each finds the blocks the one before left
        with_cache = cached.llm.generate([prompt], params, use_tqdm=False)[0]
        without = plain.llm.generate([prompt], params, use_tqdm=False)[0]
        assert with_cache.outputs[0].token_ids == without.outputs[0].token_ids
        for got, want in zip(with_cache.outputs[0].logprobs, without.outputs[0].logprobs):
            assert {t: p.logprob for t, p in got.items()} == pytest.approx({t: p.logprob for t, p in want.items()}, abs=1e-5)
        assert without.num_cached_tokens == 0
    # The engine's own count: 192 is the last block boundary inside the first prompt (205 tokens).
    assert with_cache.num_cached_tokens == 192


def document(seed):
    rng = torch.Generator().manual_seed(seed)
    prefix, context = words(rng, 40), words(rng, 300)
    return prefix, context, [words(rng, 6) for _ in range(3)]


@CACHED_FAMILIES
@pytest.mark.parametrize("mode", ["select", "summarize"])
def test_second_question_reuses_chunk_states_with_identical_answers(engines, mode):
    cached, plain = engines
    prefix, context, questions = document(seed=7 if mode == "select" else 8)
    config = OPRMConfig(chunk_size=CHUNK, mode=mode, max_batch_tokens=250, prefix_cache=True)
    prefix_length = len(cached.tokenizer(prefix).input_ids)  # 41 with BOS: P spans one block
    aligned = aligned_chunk_size(prefix_length, CHUNK, BLOCK)
    assert (prefix_length + aligned) % BLOCK == 0 and CHUNK - BLOCK < aligned <= CHUNK
    uncached = OPRMConfig(chunk_size=aligned, mode=mode, max_batch_tokens=250)
    selections = []
    for question in questions + questions[:1]:  # the last asks the first question again
        prompt = OPRMPrompt(prefix, context, question)
        got = cached.generate([prompt], GREEDY, oprm=config, use_tqdm=False)[0]
        want = plain.generate([prompt], GREEDY, oprm=uncached, use_tqdm=False)[0]
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        assert (got.oprm.num_chunks, got.oprm.selected_chunk) == (want.oprm.num_chunks, want.oprm.selected_chunk)
        assert got.oprm.entropies == pytest.approx(want.oprm.entropies, abs=1e-5)
        assert want.oprm.cached_tokens == 0
        selections.append(got.oprm)

    suffix = len(cached.tokenizer(questions[0], add_special_tokens=False).input_ids)
    rows = [prefix_length + len(chunk) + suffix for chunk in _chunks(len(context.split()), aligned)]
    shared = prefix_length // BLOCK * BLOCK
    cold, *warm = selections
    assert cold.prefill_tokens == sum(rows) + shared + 1  # the rows and the warm-up that caches P
    assert cold.cached_tokens == len(rows) * shared  # every row starts from P's cached state
    for selection in warm:
        # Every row but the last (the context's remainder) ends [P, C_i] on a block boundary: it
        # recomputes only the question; the warm-up recomputes its one token past P.
        full_rows = len(rows) - 1
        assert selection.prefill_tokens - selection.cached_tokens <= full_rows * suffix + 1 + BLOCK + suffix
        assert selection.cached_tokens >= shared + full_rows * (prefix_length + aligned)


def _chunks(total: int, size: int) -> list[range]:
    return [range(start, min(start + size, total)) for start in range(0, total, size)]


@MAMBA2
def test_prefix_cache_needs_an_engine_with_it(engines):
    prefix, context, questions = document(seed=9)
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        engines[1].generate([OPRMPrompt(prefix, context, questions[0])], GREEDY, oprm=OPRMConfig(prefix_cache=True))


# -- the server: --oprm-prefix-cache ------------------------------------------------------------------


@MAMBA2
def test_server_reports_cached_tokens_and_engine_hits(model_dir, engines):
    prefix, context, questions = document(seed=10)
    plain = engines[1]
    aligned = aligned_chunk_size(len(plain.tokenizer(prefix).input_ids), CHUNK, BLOCK)
    args = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "1024", "--block-size", str(BLOCK)]
    with oprm_server(model_dir, *args, "--oprm-prefix-cache", "true", "--oprm-chunk-size", str(CHUNK)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        bodies = []
        for question in questions[:2]:
            response = client.completions.create(
                model=model_dir, prompt=f"{prefix} {{{{context}}}} {question}", max_tokens=8, temperature=0.0,
                extra_body={"ignore_eos": True, "return_token_ids": True, "oprm": {"context": context}},
            )
            want = plain.generate([OPRMPrompt(prefix, context, question)], GREEDY,
                                  oprm=OPRMConfig(chunk_size=aligned), use_tqdm=False)[0]
            assert response.choices[0].token_ids == want.outputs[0].token_ids
            bodies.append(response.model_extra["oprm"])
        cold, warm = (body["prefill_tokens"] for body in bodies)
        assert cold["total"] == warm["total"] and cold["computed"] == cold["total"] - cold["cached"]
        assert warm["computed"] < cold["computed"] // 5
        assert metric(server.url, "vllm:prefix_cache_hits_total") >= cold["cached"] + warm["cached"]
        assert metric(server.url, "oprm_prefill_tokens_total", source="cached") == cold["cached"] + warm["cached"]
        # A request may still turn the cache layout off.
        off = client.completions.create(
            model=model_dir, prompt=f"{prefix} {{{{context}}}} {questions[0]}", max_tokens=8, temperature=0.0,
            extra_body={"ignore_eos": True, "oprm": {"context": context, "prefix_cache": False}},
        )
        assert off.model_extra["oprm"]["num_chunks"] == len(_chunks(len(context.split()), CHUNK))
        assert metric(server.url, "vllm:num_requests_running") == 0


def test_recent_documents_tokenize_a_long_text_once():
    from vllm_oprm.entrypoints.server import RecentDocuments

    class CountingTokenizer:  # a fake for this unit of pure caching logic
        calls = 0

        def __len__(self):
            return 7

        def encode(self, text, add_special_tokens=True):
            self.calls += 1
            return [len(text), int(add_special_tokens)]

    inner = CountingTokenizer()
    recent = RecentDocuments(inner, entries=2, min_chars=10)
    long_a, long_b, long_c = "a" * 20, "b" * 20, "c" * 20
    assert recent.encode(long_a, False) == recent.encode(long_a, False) == [20, 0] and inner.calls == 1
    assert recent.encode(long_a, True) == [20, 1] and inner.calls == 2  # special tokens are part of the key
    recent.encode(long_b, False), recent.encode(long_c, False)  # evicts long_a, the least recent
    recent.encode(long_a, False)
    assert inner.calls == 5
    recent.encode("short", False), recent.encode("short", False)  # short texts are not kept
    assert inner.calls == 7 and len(recent) == 7
