"""Recurrence kernels against independent implementations."""

import pytest
import torch

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
