"""Runs flash-linear-attention's own RWKV7ForCausalLM (Triton kernels, in Triton's CPU interpreter)
on a saved model directory and prints, as one JSON object, its largest differences from the torch
reference: logits and every per-layer state. Below 64 tokens without grad fla runs its fused
recurrent kernel (its chunked kernels fail in Triton 3.9's interpreter: an ``int`` has no ``.to``).
Used by tests/test_reference_rwkv7.py in a subprocess (``TRITON_INTERPRET`` must be set first).

usage: interpreted_rwkv7.py MODEL_DIR TOKEN_ID...
"""

import json
import sys

import interpreted_kernels  # noqa: F401  (sets TRITON_INTERPRET and trims autotuning, before Triton loads)
import torch

from vllm_oprm.reference.rwkv7 import Rwkv7ForCausalLM


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def fla_errors(path: str, ids: torch.Tensor) -> dict[str, float]:
    from fla.models import RWKV7ForCausalLM

    fla_model = RWKV7ForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        logits, state = Rwkv7ForCausalLM.from_pretrained(path)(ids)
    with torch.no_grad():
        out = fla_model(input_ids=ids, use_cache=True)
    caches = [out.past_key_values[layer] for layer in range(len(fla_model.model.layers))]
    fla_state = {
        "wkv": torch.stack([c["recurrent_state"] for c in caches]),
        "att_shift": torch.stack([c["conv_state"].reshape(ids.shape[0], -1) for c in caches]),
        "ffn_shift": torch.stack([c["ffn_state"].reshape(ids.shape[0], -1) for c in caches]),
    }
    errors = {name: max_error(tensor, getattr(state, name)) for name, tensor in fla_state.items()}
    return {"logits": max_error(out.logits, logits), **errors}


if __name__ == "__main__":
    token_ids = torch.tensor([[int(t) for t in sys.argv[2:]]])
    print(json.dumps(fla_errors(sys.argv[1], token_ids)))
