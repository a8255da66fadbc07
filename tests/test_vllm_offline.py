"""OPRM through a real vLLM V1 engine (CPU build), checked against the reference backend."""

import math

import pytest

pytest.importorskip("vllm")

from vllm import SamplingParams  # noqa: E402

from vllm_oprm import OPRMConfig, OPRMPrompt  # noqa: E402
from vllm_oprm.core import build_rows  # noqa: E402
from vllm_oprm.reference import OPRMGenerator  # noqa: E402
from vllm_oprm.testing import build_model_dir, same_words  # noqa: E402

from poisoned_logits import POISON_ID, PoisonFirstTokens  # noqa: E402
from families import families  # noqa: E402
from reference_checks import assert_same_as_reference, prompts  # noqa: E402

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


# FalconMamba runs through patches/, RWKV6, RecurrentGemma and RWKV7 through models/
@pytest.fixture(scope="module", params=families("mamba2", "falcon_mamba", "rwkv6", "recurrent_gemma", "rwkv7"))
def mamba2(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(request.param))
    model, tokenizer = build_model_dir(request.param, path, seed=1)
    return path, OPRMGenerator(model, tokenizer)


@pytest.fixture(scope="module")
def llm(mamba2):
    from vllm_oprm import OPRMLLM

    engine = OPRMLLM(
        model=mamba2[0], dtype="float32", enforce_eager=True, max_model_len=512, max_num_seqs=16,
        disable_log_stats=False, logits_processors=[PoisonFirstTokens],
    )
    yield engine
    engine.llm.llm_engine.engine_core.shutdown()  # free the CPU before the next family's engine


@pytest.mark.parametrize("budget", [26, 60, 100_000])  # one row per batch, two rows, all rows
def test_select_equals_reference(llm, mamba2, budget):
    config = OPRMConfig(chunk_size=16, max_batch_tokens=budget, early_exit_entropy=None)  # off, as by default
    batch = prompts(seed=budget, count=4)
    outs = llm.generate(batch, GREEDY, oprm=config, use_tqdm=False)
    for prompt, out in zip(batch, outs):
        assert_same_as_reference(out, mamba2[1].generate(prompt, config, max_new_tokens=10, eos_token_id=-1))
    assert {out.oprm.num_chunks for out in outs} == {5}
    assert len({out.request_id for out in outs}) == 4


@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_early_exit_equals_reference(llm, mamba2, order):
    for prompt in prompts(seed=21, count=3):
        entropies = mamba2[1].generate(prompt, OPRMConfig(chunk_size=16, max_batch_tokens=26), max_new_tokens=1).entropies
        # met within the first three chunks read (one per batch): the other two are never prefilled
        threshold = min(entropies[:3] if order == "forward" else entropies[2:]) + 1e-3
        config = OPRMConfig(chunk_size=16, max_batch_tokens=26, early_exit_entropy=threshold, chunk_order=order)
        out = llm.generate([prompt], GREEDY, oprm=config, use_tqdm=False)[0]
        ref = mamba2[1].generate(prompt, config, max_new_tokens=10, eos_token_id=-1)
        assert ref.stopped_early and out.oprm.stopped_early
        assert_same_as_reference(out, ref)
        assert out.oprm.chunks_read <= 3
        assert out.oprm.prefill_tokens == sum(len(row) for row in llm_rows(llm, prompt, config)[: out.oprm.chunks_read])


def llm_rows(llm, prompt, config):
    """The rows of ``prompt`` in the order they are read."""
    layout = build_rows(prompt.tokenize(llm.tokenizer), config)
    return [layout.rows[c] for batch in layout.batches for c in batch]


@pytest.mark.parametrize("mode", ["summarize", "last"])
def test_summarize_and_last_equal_reference(llm, mamba2, mode):
    config = OPRMConfig(chunk_size=16, mode=mode, max_batch_tokens=60, summary_separator=" | ")
    batch = prompts(seed=11, count=2, context_words=40)
    outs = llm.generate(batch, GREEDY, oprm=config, use_tqdm=False)
    for prompt, out in zip(batch, outs):
        ref = mamba2[1].generate(prompt, config, max_new_tokens=10, eos_token_id=-1)
        assert out.outputs[0].token_ids == ref.token_ids
        assert same_words(out.outputs[0].text, ref.text)
        assert (out.oprm.num_chunks, out.oprm.selected_chunk) == (ref.num_chunks, ref.selected_chunk)


def test_idk_filter_changes_the_choice(llm, mamba2):
    prompt = prompts(seed=12, count=1)[0]
    base = llm.generate([prompt], GREEDY, oprm=OPRMConfig(chunk_size=16), use_tqdm=False)[0]
    idk = base.outputs[0].token_ids[0]  # the winner's first token, declared "I don't know"
    config = OPRMConfig(chunk_size=16, idk_token_ids=[idk])
    out = llm.generate([prompt], GREEDY, oprm=config, use_tqdm=False)[0]
    ref = mamba2[1].generate(prompt, config, max_new_tokens=10, eos_token_id=-1)
    assert_same_as_reference(out, ref)
    assert out.oprm.selected_chunk != base.oprm.selected_chunk or out.outputs[0].token_ids[0] == idk


def test_single_chunk_equals_vanilla_vllm_and_mixed_batches_come_back_right(llm, mamba2):
    tokenizer = llm.tokenizer
    oprm_prompts = prompts(seed=13, count=3, context_words=40)
    tps = [p.tokenize(tokenizer) for p in oprm_prompts]
    plain = [{"prompt_token_ids": tp.vanilla_ids} for tp in tps]
    mixed = llm.generate([oprm_prompts[0], plain[0], oprm_prompts[1], "w1 w2 w3", oprm_prompts[2], plain[1]],
                         GREEDY, oprm=OPRMConfig(chunk_size=40), use_tqdm=False)
    one_by_one = [llm.generate([p], GREEDY, use_tqdm=False)[0] for p in plain]
    assert mixed[1].oprm is None and mixed[3].oprm is None
    for oprm_out, alone in zip([mixed[0], mixed[2], mixed[4]], one_by_one):
        assert oprm_out.oprm.num_chunks == 1
        assert oprm_out.outputs[0].token_ids == alone.outputs[0].token_ids
    assert mixed[1].outputs[0].token_ids == one_by_one[0].outputs[0].token_ids
    assert mixed[5].outputs[0].token_ids == one_by_one[1].outputs[0].token_ids


def test_a_chunk_with_nan_logits_never_wins(llm, mamba2):
    """Chunk 0's first-token logits are NaN in the engine (``PoisonFirstTokens``), and it is scored
    first: the choice is the reference's among the other chunks, decoded as plain vLLM decodes it."""
    plain = prompts(seed=16, count=1)[0].tokenize(llm.tokenizer)
    context = [POISON_ID] + plain.context_ids[1:]
    prompt = OPRMPrompt(plain.prefix_ids, context, plain.suffix_ids)
    config = OPRMConfig(chunk_size=16, max_batch_tokens=100_000)
    out = llm.generate([prompt], GREEDY, oprm=config, use_tqdm=False)[0]
    ref = mamba2[1].generate(prompt, config, max_new_tokens=10, eos_token_id=-1)
    others = ref.entropies[1:]
    assert math.isnan(out.oprm.entropies[0]) and out.oprm.entropies[1:] == pytest.approx(others, abs=1e-4)
    assert out.oprm.selected_chunk == 1 + others.index(min(others))
    row = plain.prefix_ids + context[16 * out.oprm.selected_chunk :][:16] + plain.suffix_ids
    alone = llm.generate([{"prompt_token_ids": row}], GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == alone.outputs[0].token_ids


def test_an_error_in_the_loop_aborts_every_request_and_drops_its_records(llm, monkeypatch):
    """The loop fails right after the step that made the first tokens, before they are scored."""
    step = llm.engine.step

    def step_then_fail():
        outputs = step()
        if any(out.outputs[0].token_ids for out in outputs):
            raise RuntimeError("interrupted")
        return outputs

    monkeypatch.setattr(llm.engine, "step", step_then_fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        llm.generate([*prompts(seed=17, count=3), "w1 w2"], GREEDY, oprm=OPRMConfig(chunk_size=16), use_tqdm=False)
    monkeypatch.undo()
    assert not llm.engine.has_unfinished_requests()
    assert llm.llm.collective_rpc("oprm_num_records") == [0]
    assert llm.generate(prompts(seed=17, count=1), GREEDY, oprm=OPRMConfig(chunk_size=16), use_tqdm=False)[0].finished


def test_200_mixed_requests_with_errors_leave_no_records(llm, monkeypatch):
    """Finished, aborted (an interrupted loop) and refused requests, OPRM in every mode and plain."""
    configs = [OPRMConfig(chunk_size=16, mode=mode, max_batch_tokens=budget)
               for mode, budget in [("select", 26), ("select", 100_000), ("summarize", 60), ("last", 60)]]
    batch = prompts(seed=18, count=50, context_words=40)
    for config in configs[:2]:  # 100 that finish, plain ones among them
        llm.generate([*batch[:40], *[f"w{i} w{i + 1}" for i in range(10)]], GREEDY, oprm=config, use_tqdm=False)
    for config in configs[2:]:  # 40 that finish
        llm.generate(batch[:20], GREEDY, oprm=config, use_tqdm=False)
    step, steps = llm.engine.step, []

    def step_then_fail():
        steps.append(1)
        if len(steps) == 3:
            raise KeyboardInterrupt
        return step()

    monkeypatch.setattr(llm.engine, "step", step_then_fail)
    with pytest.raises(KeyboardInterrupt):  # 50 in the engine when the loop is interrupted
        llm.generate(batch, GREEDY, oprm=configs[0], use_tqdm=False)
    monkeypatch.undo()
    refused = [*batch[:9], OPRMPrompt("w1", "", "w2")]  # 10 refused before any reaches the engine
    with pytest.raises(ValueError, match="context is empty"):
        llm.generate(refused, GREEDY, oprm=configs[0], use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert llm.llm.collective_rpc("oprm_num_records") == [0]
    assert llm.generate(["w1 w2"], SamplingParams(max_tokens=1), use_tqdm=False)[0].finished  # still serving


def running_requests(llm) -> float:
    for metric in llm.llm.get_metrics():
        if metric.name == "vllm:num_requests_running":
            return metric.value
    raise AssertionError("vllm:num_requests_running is not reported")


def test_one_state_slot_while_the_winner_decodes_and_none_after(llm, monkeypatch):
    prompt = prompts(seed=14, count=1)[0]
    seen = []
    step = llm.engine.step

    def step_and_count():
        outputs = step()
        seen.append(running_requests(llm))
        return outputs

    monkeypatch.setattr(llm.engine, "step", step_and_count)
    long_decode = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    out = llm.generate([prompt], long_decode, oprm=OPRMConfig(chunk_size=16), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 40 and out.oprm.num_chunks == 5
    assert max(seen) == 5  # all five chunk rows prefilled side by side
    assert seen[-30:-1] == [1] * 29  # then only the winner decodes
    monkeypatch.undo()
    llm.generate(["w1 w2"], SamplingParams(max_tokens=1), use_tqdm=False)  # refresh the gauges
    assert running_requests(llm) == 0


@pytest.mark.parametrize(
    "params, config, prompt, message",
    [
        (SamplingParams(n=2), OPRMConfig(chunk_size=16), None, "n=2"),
        (SamplingParams(max_tokens=10), OPRMConfig(chunk_size=600), OPRMPrompt("w1", "w2 " * 600, "w3"), "max_model_len"),
        (GREEDY, OPRMConfig(chunk_size=16), OPRMPrompt([1], [10**6], [2]), "vocabulary"),
        (GREEDY, OPRMConfig(chunk_size=16), OPRMPrompt("w1", "", "w2"), "context is empty"),
        (SamplingParams(extra_args={"oprm_capture": "mine"}), OPRMConfig(chunk_size=16), None, "is reserved"),
        (SamplingParams(extra_args={"oprm_capture": "mine"}), OPRMConfig(chunk_size=16), "w1 w2", "is reserved"),
    ],
)
def test_bad_requests_raise_before_reaching_the_engine(llm, params, config, prompt, message):
    prompt = prompt or prompts(seed=15, count=1)[0]
    with pytest.raises(ValueError, match=message):
        llm.generate([prompt], params, oprm=config, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert llm.generate(["w1 w2"], SamplingParams(max_tokens=2), use_tqdm=False)[0].finished

