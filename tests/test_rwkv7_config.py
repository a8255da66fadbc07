"""The RWKV7 config class the plugin registers, and the sizes the vLLM class builds from it, against what
flash-linear-attention 0.6 builds from the same fields."""

import pytest

from vllm_oprm.models.rwkv7_config import Rwkv7HFConfig, rwkv7_sizes

FLA_CONFIG = {  # fields as fla's save_pretrained writes them, LoRA ranks left null
    "architectures": ["RWKV7ForCausalLM"], "model_type": "rwkv7", "hidden_size": 1024, "head_dim": 128,
    "num_heads": 8, "num_hidden_layers": 2, "hidden_ratio": 3.5, "intermediate_size": None,
    "decay_low_rank_dim": None, "a_low_rank_dim": None, "v_low_rank_dim": None, "gate_low_rank_dim": None,
    "value_dim": [1024, 1024], "hidden_act": "sqrelu", "attn": None, "max_position_embeddings": 2048,
    "norm_eps": 1e-5, "fuse_norm": True, "vocab_size": 100,
}


def test_config_drops_max_position_embeddings_and_keeps_the_rest():
    config = Rwkv7HFConfig(**FLA_CONFIG)
    assert not hasattr(config, "max_position_embeddings")  # vLLM would cap max_model_len at fla's 2048
    assert (config.model_type, config.architectures, config.head_dim, config.value_dim) == (
        "rwkv7", ["RWKV7ForCausalLM"], 128, [1024, 1024])


def test_sizes_fill_null_fields_as_flash_linear_attention_does():
    pytest.importorskip("fla")
    from fla.layers.rwkv7 import RWKV7Attention
    from fla.models.rwkv7.modeling_rwkv7 import RWKV7FeedForward

    c = FLA_CONFIG
    attn = RWKV7Attention(hidden_size=c["hidden_size"], head_dim=c["head_dim"], layer_idx=1, num_hidden_layers=2)
    ffn = RWKV7FeedForward(c["hidden_size"], hidden_ratio=c["hidden_ratio"], layer_idx=1, num_hidden_layers=2)
    sizes = rwkv7_sizes(Rwkv7HFConfig(**c))
    assert sizes == (attn.num_heads, attn.head_dim, ffn.intermediate_size, attn.w_lora.lora[0].out_features,
                     attn.a_lora.lora[0].out_features, attn.v_lora.lora[0].out_features,
                     attn.g_lora.lora[0].out_features)


@pytest.mark.parametrize(
    "field, value", [("attn", {"layers": [1]}), ("hidden_act", "relu"), ("value_dim", [2048, 2048])]
)
def test_sizes_refuse_what_the_class_does_not_implement(field, value):
    with pytest.raises(ValueError, match=field):
        rwkv7_sizes(Rwkv7HFConfig(**FLA_CONFIG | {field: value}))
