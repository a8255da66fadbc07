"""The detokenizer patch: a chunk request's text is the same whether its stream is primed with
the whole prompt (vLLM) or with the prompt's last few tokens (the patch).

Prompts are real text (valid UTF-8, as a prompt sent to vLLM is); the generated tokens are random,
multi-byte pieces and invalid sequences included."""

import pytest
import torch

tokenizers = pytest.importorskip("tokenizers")

from vllm_oprm.testing import build_tokenizer  # noqa: E402


PIECES = ["Zürich", "straße", "東京", "タワー", "naïve", "café", "—", "ünïcödé", "the", "quick", "fox", "dog", "🙂"]


def byte_level_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(PIECES) * 3], trainer)
    return tok


def streamed(tokenizer, prompt, new, prime):
    stream = tokenizers.decoders.DecodeStream(ids=prime(prompt), skip_special_tokens=False)
    return "".join(stream.step(tokenizer, t) or "" for t in new)


@pytest.mark.parametrize("kind", ["word level", "byte-level BPE"])
def test_prompt_tail_priming_prints_the_same_text(tmp_path, kind):
    from vllm_oprm.patches.detokenizer_prompt_tail import PROMPT_TAIL

    if kind == "word level":
        tokenizer, pieces = build_tokenizer(str(tmp_path))._tokenizer, [f"w{i}" for i in range(251)]
    else:
        tokenizer, pieces = byte_level_bpe(), PIECES
    vocab = tokenizer.get_vocab_size()
    rng = torch.Generator().manual_seed(0)
    one_token_differs = 0
    for _ in range(200):
        text = " ".join(pieces[i] for i in torch.randint(0, len(pieces), (150,), generator=rng).tolist())
        prompt = tokenizer.encode(text).ids
        new = torch.randint(0, vocab, (20,), generator=rng).tolist()
        whole = streamed(tokenizer, prompt, new, lambda ids: ids)
        assert streamed(tokenizer, prompt, new, lambda ids: ids[-PROMPT_TAIL:]) == whole
        one_token_differs += streamed(tokenizer, prompt, new, lambda ids: ids[-1:]) != whole
    if kind == "byte-level BPE":  # a tail that cuts a character in two does print differently
        assert one_token_differs > 0


PATCHES = (
    "cpu_mamba1", "cpu_mamba2_checkpoints", "cpu_ray", "cpu_rotary_heads", "detokenizer_prompt_tail", "hf_configs", "model_configs", "runner_logits_processor",
    "serve_engine_args",
)


@pytest.mark.parametrize("name", PATCHES)
def test_every_patch_names_its_vllm_releases_and_refuses_others(monkeypatch, name):
    import importlib

    import vllm

    from vllm_oprm.plugin import SUPPORTED_VLLM

    patch = importlib.import_module(f"vllm_oprm.patches.{name}")
    assert set(patch.TARGET_VLLM) <= set(SUPPORTED_VLLM)
    monkeypatch.setattr(vllm, "__version__", "0.31.0")
    with pytest.raises(RuntimeError, match=rf"patches/{name}\.py targets vLLM .*found 0\.31\.0"):
        patch.apply(*{"detokenizer_prompt_tail": ("key",), "hf_configs": ([],), "model_configs": ([],), "runner_logits_processor": ("v1", "v2"),
                      "serve_engine_args": ("proc", str)}.get(name, ()))


def plugin_probe(version: str | None) -> dict:
    """Registers the plugin in a fresh interpreter (vLLM's registry is per process), optionally
    pretending to be another vLLM release; reports what it registered and, on a pretended release,
    what ``OPRMLLM`` says (on the real one it would start an engine)."""
    script = f"""
import json, vllm
if {version!r}: vllm.__version__ = {version!r}
from vllm import ModelRegistry
from vllm_oprm import OPRMLLM, plugin
plugin.register()
probe = {{"registered": sorted(set(plugin.MODELS) & set(ModelRegistry.get_supported_archs()))}}
if {version!r}:
    try:
        OPRMLLM(model="unused")
    except RuntimeError as exc:
        probe["error"] = str(exc)
print(json.dumps(probe))
"""
    return fresh_interpreter(script)


def fresh_interpreter(script: str) -> dict:
    """What ``script``, run in a new Python process, prints as JSON on its last line."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_plugin_registers_every_family_on_the_installed_release():
    from vllm_oprm.plugin import MODELS

    assert plugin_probe(None)["registered"] == sorted(MODELS)


def test_unsupported_vllm_registers_nothing_and_oprm_names_the_supported_releases():
    probe = plugin_probe("0.34.0")
    assert probe["registered"] == []
    assert "vllm-oprm supports vLLM 0.32.0 and 0.33.0; found vLLM 0.34.0" in probe["error"]


def test_vllm_loads_the_plugin_configs_after_flash_linear_attention_registers_its_own(tmp_path):
    """Importing fla registers its RWKV6Config and RWKV7Config for the same model types; vLLM must still load
    the plugin's (patches/hf_configs.py), or RWKV7's max_model_len would be capped at fla's 2048."""
    import json

    pytest.importorskip("fla")
    for model_type in ("rwkv6", "rwkv7"):
        (tmp_path / model_type).mkdir()
        config = {"model_type": model_type, "hidden_size": 64, "max_position_embeddings": 2048}
        (tmp_path / model_type / "config.json").write_text(json.dumps(config))
    loaded = fresh_interpreter(f"""
import json
from vllm_oprm import plugin
plugin.register()
import fla.models  # registers fla's config classes with transformers' AutoConfig
from vllm.transformers_utils.config import get_config
configs = {{t: get_config({str(tmp_path)!r} + "/" + t, trust_remote_code=False) for t in ("rwkv6", "rwkv7")}}
print(json.dumps({{t: [type(c).__name__, getattr(c, "max_position_embeddings", None)] for t, c in configs.items()}}))
""")
    assert loaded["rwkv6"][0] == "Rwkv6HFConfig"
    assert loaded["rwkv7"] == ["Rwkv7HFConfig", None]


def per_head_rotary_inputs():
    """A neox rotary embedding (head size 32) and 3-D query and key: two query heads, one key head."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding

    with set_current_vllm_config(VllmConfig()):
        rope = RotaryEmbedding(32, 32, 256, 10000.0, True, torch.float32)
    rng = torch.Generator().manual_seed(0)
    positions = torch.arange(3, 10)
    return rope, positions, torch.randn(7, 2, 32, generator=rng), torch.randn(7, 1, 32, generator=rng)


def test_cpu_rotary_kernel_still_mis_rotates_per_head_input():
    """While this holds, patches/cpu_rotary_heads.py is needed; 2-D rows of the same numbers are exact."""
    from vllm import _custom_ops as ops

    rope, positions, query, key = per_head_rotary_inputs()
    expected, _ = rope.forward_native(positions, query.clone(), key.clone())
    per_head, rows = query.clone(), query.clone()
    ops.rotary_embedding(positions, per_head, key.clone(), 32, rope.cos_sin_cache, True)
    ops.rotary_embedding(positions, rows.view(7, -1), key.clone().view(7, -1), 32, rope.cos_sin_cache, True)
    assert not torch.allclose(per_head, expected, atol=1e-3)
    assert torch.allclose(rows, expected, atol=1e-5)


def test_patched_cpu_rotary_equals_native_in_place():
    from vllm_oprm.patches import cpu_rotary_heads

    cpu_rotary_heads.apply()
    rope, positions, query, key = per_head_rotary_inputs()
    expected_query, expected_key = rope.forward_native(positions, query.clone(), key.clone())
    rotated_query, rotated_key = rope.forward_cpu(positions, query, key)
    assert rotated_query is query and rotated_key is key
    assert torch.allclose(query, expected_query, atol=1e-5) and torch.allclose(key, expected_key, atol=1e-5)
