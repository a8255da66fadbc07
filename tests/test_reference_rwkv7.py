"""The torch RWKV7 reference against flash-linear-attention's own RWKV7 (fla's Triton kernels, run by
Triton's CPU interpreter), and its carried state against one long prefill. Its WKV recurrence is
``vllm_oprm.ops.wkv7.wkv7_recurrent_ref``, checked against fla's naive one in tests/test_rwkv7_ops.py."""

import json
import os
import subprocess
import sys

import pytest
import torch

from vllm_oprm.reference.rwkv7 import Rwkv7ForCausalLM
from vllm_oprm.testing import build_model_dir, words

pytest.importorskip("fla")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("rwkv7")
    build_model_dir("rwkv7", str(path), seed=1)
    return str(path)


@pytest.fixture(scope="module")
def model(model_dir):
    return Rwkv7ForCausalLM.from_pretrained(model_dir)


def test_reference_equals_fla_model_in_triton_interpreter(model_dir):
    """fla's RWKV7ForCausalLM (fused recurrent kernel path) on 40 tokens: logits and every state."""
    rng = torch.Generator().manual_seed(2)
    ids = torch.randint(5, 256, (40,), generator=rng).tolist()
    script = os.path.join(os.path.dirname(__file__), "interpreted_rwkv7.py")
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1"}  # fla torch.compiles its squared ReLU: eager is the same math
    done = subprocess.run(
        [sys.executable, script, model_dir, *map(str, ids)], capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(errors) == {"logits", "wkv", "att_shift", "ffn_shift"}
    assert max(errors.values()) < 1e-4, errors


def test_prefill_then_token_steps_equal_one_prefill(model):
    ids = torch.randint(5, 256, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole, whole_state = model(ids)
        logits, state = model(ids[:, :25])
        steps = [logits]
        for t in range(25, 40):
            logits, state = model(ids[:, t : t + 1], state=state)
            steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, atol=1e-5, rtol=0)
    for name in ("att_shift", "wkv", "ffn_shift"):
        # one token's projections round differently from forty's (in float64 both runs agree exactly),
        # and the WKV state, reaching |26| here, carries those last-bit differences on: up to 2.2e-5 seen
        torch.testing.assert_close(getattr(state, name), getattr(whole_state, name), atol=5e-5, rtol=1e-5)


def test_tiny_model_answers_differently_to_different_inputs(model, model_dir):
    """build_model spreads fla's near-zero init out: greedy tokens and entropies must vary with the input."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rng = torch.Generator().manual_seed(4)
    firsts, entropies = [], []
    with torch.no_grad():
        for _ in range(8):
            logits, _ = model(torch.tensor([tokenizer.encode(words(rng, 20))]))
            firsts.append(int(logits[0, -1].argmax()))
            entropies.append(float(torch.distributions.Categorical(logits=logits[0, -1]).entropy()))
    assert len(set(firsts)) >= 4, firsts
    assert max(entropies) - min(entropies) > 0.1, entropies
