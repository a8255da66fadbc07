"""Tiny models of vLLM's own hybrid and recurrent classes, and of a transformer (the control), shared by the
in-tree engine and server tests."""

import torch
import transformers as tf

from vllm_oprm.testing import BOS_ID, EOS_ID, PAD_ID, build_tokenizer, spread_weights

ATTENTION = dict(num_attention_heads=2, num_key_value_heads=1)  # head size 32: the smallest vLLM CPU attention runs
MAMBA2 = dict(mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16, mamba_n_groups=1, mamba_d_conv=4, mamba_expand=2)

# Hidden 64, at least one attention and one recurrent layer in each hybrid.
# Not here: Bamba (vLLM dropped BambaForCausalLM in 0.23); Qwen3-Next (vLLM's CPU gated-delta-net refuses fp32,
# "CPU GDN attention requires BF16", and transformers' Qwen3-Next needs a Triton driver this CPU lacks).
TINY_CONFIGS = {
    "llama": lambda: tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=32, **ATTENTION),
    "falcon_h1": lambda: tf.FalconH1Config(  # every layer runs attention and Mamba2 side by side
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=32, mamba_d_ssm=128,
        mamba_chunk_size=64, **ATTENTION, **MAMBA2,
    ),
    "zamba2": lambda: tf.Zamba2Config(  # Mamba2 layers and one shared attention block
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, layers_block_type=["mamba", "hybrid", "mamba"],
        mamba_d_state=16, n_mamba_heads=8, mamba_ngroups=1, chunk_size=64, num_attention_heads=4,
        num_key_value_heads=4, use_mem_rope=True,  # heads of 2 * hidden / 4 = 32
    ),
    "granite_moe_hybrid": lambda: tf.GraniteMoeHybridConfig(
        hidden_size=64, intermediate_size=64, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
        num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=64, position_embedding_type="rope",
        mamba_chunk_size=64, **ATTENTION, **MAMBA2,
    ),
    "nemotron_h": lambda: tf.NemotronHConfig(
        hidden_size=64, intermediate_size=128, layers_block_type=["linear_attention", "full_attention", "mlp"],
        head_dim=32, ssm_state_size=16, mamba_num_heads=8, mamba_head_dim=16, n_groups=1, chunk_size=64, **ATTENTION,
    ),
    "lfm2": lambda: tf.Lfm2Config(  # short convolutions and attention
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, layer_types=["conv", "full_attention"],
        block_auto_adjust_ff_dim=False, **ATTENTION,
        conv_dim=64, block_dim=64,  # read by vLLM, as published LFM2 configs carry them; transformers uses hidden_size
    ),
}


def build_in_tree_model_dir(architecture: str, path: str, seed: int = 1):
    """The word tokenizer and a seeded random fp32 model of ``architecture``, saved in ``path``."""
    tokenizer = build_tokenizer(path)
    config = TINY_CONFIGS[architecture]()
    # tie_word_embeddings stays each class's default: vLLM's Zamba2 and LFM2 always tie the head to the embeddings
    config.update(dict(vocab_size=len(tokenizer), pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID))
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    spread_weights(model)
    model.save_pretrained(path)
    return model, tokenizer
