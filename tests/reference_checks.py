"""OPRM prompts and the comparison of an engine's answer with the reference's, shared by the engine tests."""

import pytest
import torch

from vllm_oprm import OPRMPrompt
from vllm_oprm.testing import same_words, words


def prompts(seed, count, context_words=70):
    rng = torch.Generator().manual_seed(seed)
    return [OPRMPrompt(words(rng, 5), words(rng, context_words), words(rng, 4)) for _ in range(count)]


def assert_same_as_reference(out, ref):
    assert out.outputs[0].token_ids == ref.token_ids
    assert same_words(out.outputs[0].text, ref.text)
    assert (out.oprm.num_chunks, out.oprm.selected_chunk) == (ref.num_chunks, ref.selected_chunk)
    assert out.oprm.entropies == pytest.approx(ref.entropies, abs=1e-4)
