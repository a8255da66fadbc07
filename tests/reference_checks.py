"""OPRM prompts and the comparison of an engine's answer with the reference's, shared by the engine tests.

A served check takes ``server``, the tuple a server fixture yields: (url, openai client, model path,
reference generator on the same model).
"""

import pytest
import torch

from vllm_oprm import OPRMConfig, OPRMPrompt
from vllm_oprm.testing import same_words, words

CHUNK = 16  # the chunk size the servers run with (--oprm-chunk-size)
GREEDY = {"max_tokens": 10, "temperature": 0.0}
EXACT = {"ignore_eos": True, "return_token_ids": True}


def prompts(seed, count, context_words=70):
    rng = torch.Generator().manual_seed(seed)
    return [OPRMPrompt(words(rng, 5), words(rng, context_words), words(rng, 4)) for _ in range(count)]


def assert_same_as_reference(out, ref):
    assert out.outputs[0].token_ids == ref.token_ids
    assert same_words(out.outputs[0].text, ref.text)
    assert (out.oprm.num_chunks, out.oprm.selected_chunk) == (ref.num_chunks, ref.selected_chunk)
    assert out.oprm.entropies == pytest.approx(ref.entropies, abs=1e-4)


def layout(seed, context_words=70):
    rng = torch.Generator().manual_seed(seed)
    return words(rng, 5), words(rng, context_words), words(rng, 4)


def template(prefix, suffix):
    return f"{prefix} {{{{context}}}} {suffix}"


def complete(server, prefix, context, suffix, oprm=None, xargs=None, **kwargs):
    _, client, path, _ = server
    extra = {**EXACT, "oprm": {"context": context, **(oprm or {})}, "vllm_xargs": xargs}
    return client.completions.create(
        model=path, prompt=template(prefix, suffix), **{**GREEDY, **kwargs}, extra_body=extra
    )


def reference(server, prefix, context, suffix, **config):
    config = OPRMConfig(**{"chunk_size": CHUNK, **config})
    return server[3].generate(OPRMPrompt(prefix, context, suffix), config, max_new_tokens=10, eos_token_id=-1)


def assert_matches(choice, selection, ref):
    assert choice.token_ids == ref.token_ids
    assert same_words(choice.text if hasattr(choice, "text") else choice.message.content, ref.text)
    assert (selection["num_chunks"], selection["selected_chunk"]) == (ref.num_chunks, ref.selected_chunk)
    assert selection["entropies"] == pytest.approx(ref.entropies, abs=1e-4)


def assert_served_select_equals_reference(server, budget, context_words, num_chunks):
    parts = layout(seed=budget, context_words=context_words)
    out = complete(server, *parts, oprm={"max_batch_tokens": budget})
    ref = reference(server, *parts, max_batch_tokens=budget)
    assert ref.num_chunks == num_chunks
    assert_matches(out.choices[0], out.oprm, ref)


def assert_served_mode_equals_reference(server, mode, context_words=70):
    parts = layout(seed=7, context_words=context_words)
    out = complete(server, *parts, oprm={"mode": mode})
    ref = reference(server, *parts, mode=mode)
    assert_matches(out.choices[0], out.oprm, ref)
    if mode == "summarize":
        assert out.choices[0].text.count("\n") == ref.num_chunks - 1


def assert_served_single_chunk_equals_vanilla(server):
    prefix, context, suffix = layout(seed=11, context_words=CHUNK - 3)
    out = complete(server, prefix, context, suffix)
    _, client, path, _ = server
    vanilla = client.completions.create(model=path, prompt=f"{prefix} {context} {suffix}", **GREEDY, extra_body=EXACT)
    assert out.oprm["num_chunks"] == 1
    assert out.choices[0].token_ids == vanilla.choices[0].token_ids
    assert out.choices[0].text == vanilla.choices[0].text
    assert out.usage.prompt_tokens == vanilla.usage.prompt_tokens
    assert "oprm" not in vanilla.model_extra
