"""Recurrence kernels against independent implementations: the torch references against
fla's and transformers' own, and the GPU kernels against the references (in Triton's
interpreter on CPU, and natively where CUDA is present)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from vllm_oprm.ops.rglru import rglru_scan_ref
from vllm_oprm.ops.wkv6 import wkv6_recurrent_ref


def test_wkv6_reference_equals_flash_linear_attention_naive_recurrence():
    fla_naive = pytest.importorskip("fla.ops.rwkv6.recurrent_naive")
    g = torch.Generator().manual_seed(0)
    B, H, T, K = 2, 3, 17, 8
    r, k, v = (torch.randn(B, H, T, K, generator=g) for _ in range(3))
    log_decay = -torch.exp(torch.randn(B, H, T, K, generator=g))
    bonus = torch.randn(H, K, generator=g)
    state = torch.randn(B, H, K, K, generator=g)
    out, final = wkv6_recurrent_ref(r, k, v, log_decay, bonus, state)
    ref_out, ref_final = fla_naive.naive_recurrent_rwkv6(
        r, k, v, log_decay, bonus, scale=1.0, initial_state=state, output_final_state=True
    )
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, ref_final, atol=1e-5, rtol=1e-5)


def test_wkv6_state_carries_across_calls():
    g = torch.Generator().manual_seed(1)
    r, k, v = (torch.randn(1, 2, 9, 4, generator=g) for _ in range(3))
    log_decay = -torch.rand(1, 2, 9, 4, generator=g)
    bonus = torch.randn(2, 4, generator=g)
    zero = torch.zeros(1, 2, 4, 4)
    whole, final = wkv6_recurrent_ref(r, k, v, log_decay, bonus, zero)
    first, mid = wkv6_recurrent_ref(r[:, :, :5], k[:, :, :5], v[:, :, :5], log_decay[:, :, :5], bonus, zero)
    rest, final2 = wkv6_recurrent_ref(r[:, :, 5:], k[:, :, 5:], v[:, :, 5:], log_decay[:, :, 5:], bonus, mid)
    torch.testing.assert_close(torch.cat([first, rest], 2), whole)
    torch.testing.assert_close(final2, final)


def test_rwkv6_checkpoint_round_trip_keeps_finch_weight_names(tmp_path):
    from vllm_oprm.reference.rwkv6 import Rwkv6Config, Rwkv6ForCausalLM

    model = Rwkv6ForCausalLM(Rwkv6Config(vocab_size=50, hidden_size=32, num_hidden_layers=2, head_size=8))
    names = set(model.state_dict())
    assert {"rwkv.blocks.0.pre_ln.weight", "rwkv.blocks.1.attention.time_maa_w1", "rwkv.blocks.1.attention.time_faaaa",
            "rwkv.blocks.0.feed_forward.time_maa_k", "rwkv.ln_out.weight", "head.weight"} <= names
    model.save_pretrained(str(tmp_path))
    loaded = Rwkv6ForCausalLM.from_pretrained(str(tmp_path))
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(loaded(ids)[0], model(ids)[0])
    half = Rwkv6ForCausalLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    assert half.halve_every == 6  # fp16/bf16 rescaling as upstream does


def test_rglru_reference_equals_transformers_scan():
    from transformers.models.recurrent_gemma.modeling_recurrent_gemma import RecurrentGemmaRglru

    g = torch.Generator().manual_seed(2)
    x, a = torch.randn(2, 11, 6, generator=g), torch.rand(2, 11, 6, generator=g)
    h0 = torch.randn(2, 6, generator=g)
    no_reset = torch.zeros(2, 11, 1, dtype=torch.bool)
    hf_y, hf_h = RecurrentGemmaRglru._rnn_scan(None, x, a, no_reset, h0)
    y, h = rglru_scan_ref(x, a, h0)
    torch.testing.assert_close(y, hf_y, atol=0, rtol=0)
    torch.testing.assert_close(h, hf_h, atol=0, rtol=0)


def test_gpu_kernels_equal_references_in_triton_interpreter():
    """The exact Triton code the GPU runs (our RG-LRU scan, fla's fused recurrent RWKV6 and RWKV7),
    executed by Triton's CPU interpreter."""
    pytest.importorskip("triton")
    pytest.importorskip("fla")
    script = os.path.join(os.path.dirname(__file__), "interpreted_kernels.py")
    done = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(errors) == {"rglru_y", "rglru_h", "wkv6_out", "wkv6_state", "wkv7_out", "wkv7_state"}
    assert max(errors.values()) < 1e-4, errors

