"""Tiny local models, a word-level tokenizer and a local server, for tests, the demo and benchmarks.

No hub is needed: every family is built from a small config with seeded random
weights (spread out so that greedy decoding and entropies are not flat) and
saved as a normal Hugging Face model directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import urllib.request
from collections.abc import Iterator

import torch

from .entrypoints.local_server import LocalServer, start_local_server

FAMILIES = ("mamba", "falcon_mamba", "mamba2", "recurrent_gemma", "rwkv6", "rwkv7")
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>", "Error")
PAD_ID, BOS_ID, EOS_ID, UNK_ID, IDK_ID = range(5)


def build_tokenizer(path: str, num_words: int = 251):
    """A whitespace word-level tokenizer ("w0".."wN" plus specials) that adds <bos>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"w{i}": len(SPECIAL_TOKENS) + i for i in range(num_words)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS_ID)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    # A chat template for the server's /v1/chat/completions: BOS, then each message's words.
    fast.chat_template = "{{ bos_token }}{% for message in messages %}{{ message['content'] }} {% endfor %}"
    fast.save_pretrained(path)
    return fast


def tiny_config(family: str, vocab_size: int, **sizes):
    """The tiny transformers config of ``family`` used by tests, the demo and the AR benchmark; ``sizes``
    override its fields (benchmarks build larger ones)."""
    import transformers as tf

    ids = dict(vocab_size=vocab_size, tie_word_embeddings=False, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    mamba = dict(hidden_size=64, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4)
    tiny = {
        "mamba": (tf.MambaConfig, mamba),
        "falcon_mamba": (tf.FalconMambaConfig, mamba),
        "mamba2": (tf.Mamba2Config, dict(
            hidden_size=64, num_heads=8, head_dim=16, state_size=16, n_groups=1, expand=2,
            num_hidden_layers=2, conv_kernel=4, chunk_size=64,
        )),
        "recurrent_gemma": (tf.RecurrentGemmaConfig, dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=1, head_dim=32, lru_width=64, attention_window_size=16, conv1d_width=4,
            block_types=["recurrent", "recurrent", "attention"], logits_soft_cap=30.0,
        )),
    }
    if family not in tiny:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    config_class, fields = tiny[family]
    return config_class(**fields | ids | sizes)


def spread_weights(model: torch.nn.Module) -> None:
    """Redraw every projection and embedding wider than the usual init, so tokens and entropies vary."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                fan_in = module.weight.shape[0 if isinstance(module, torch.nn.Embedding) else 1]
                module.weight.normal_(0.0, 2.0 * fan_in**-0.5)


def build_model(family: str, path: str, vocab_size: int, seed: int = 0, **sizes):
    """A tiny random model of ``family`` (``sizes`` override config fields), saved (float32) to ``path``.

    RWKV7 is built and saved by flash-linear-attention's own ``RWKV7ForCausalLM`` (its checkpoint
    format); what is returned is the torch reference loaded back from ``path``, which runs without Triton.
    """
    torch.manual_seed(seed)
    if family == "rwkv6":
        from .reference.rwkv6 import Rwkv6Config, Rwkv6ForCausalLM

        tiny = dict(hidden_size=64, num_hidden_layers=2, head_size=16, intermediate_size=128)
        config = Rwkv6Config(vocab_size=vocab_size, bos_token_id=BOS_ID, eos_token_id=EOS_ID, **tiny | sizes)
        model = Rwkv6ForCausalLM(config).eval()
    elif family == "rwkv7":
        from fla.models import RWKV7Config, RWKV7ForCausalLM

        tiny = dict(
            hidden_size=64, num_hidden_layers=2, head_dim=16, hidden_ratio=2,
            decay_low_rank_dim=8, a_low_rank_dim=8, v_low_rank_dim=8, gate_low_rank_dim=16,
        )
        ids = dict(pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, tie_word_embeddings=False)
        model = RWKV7ForCausalLM(RWKV7Config(vocab_size=vocab_size, **tiny | ids | sizes)).eval()
        spread_weights(model)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size, **sizes)).eval()
        spread_weights(model)
    if hasattr(model, "generation_config") and model.generation_config is not None:
        model.generation_config.pad_token_id = PAD_ID
    model.save_pretrained(path)
    if family == "rwkv7":
        from .reference.rwkv7 import Rwkv7ForCausalLM

        return Rwkv7ForCausalLM.from_pretrained(path)
    return model


def build_model_dir(family: str, path: str, seed: int = 0, **sizes):
    """Tokenizer and model of ``family`` in one directory, ready for vLLM or transformers."""
    os.makedirs(path, exist_ok=True)
    tokenizer = build_tokenizer(path)
    model = build_model(family, path, vocab_size=len(tokenizer), seed=seed, **sizes)
    return model, tokenizer


def words(rng: torch.Generator, count: int, num_words: int = 251) -> str:
    """``count`` random vocabulary words joined by spaces."""
    return " ".join(f"w{i}" for i in torch.randint(0, num_words, (count,), generator=rng).tolist())


def same_words(engine_text: str, reference_text: str) -> bool:
    """vLLM detokenizes incrementally after the prompt, so the word-level tokenizer's
    continuation starts with the space that joins it to the prompt."""
    return engine_text.split() == reference_text.split()


@contextlib.contextmanager
def oprm_server(
    model_dir: str, *server_args: str, timeout_s: float = 300, env: dict[str, str] | None = None, launcher=None
) -> Iterator[LocalServer]:
    """``vllm-oprm serve MODEL`` (or ``launcher MODEL``) on 127.0.0.1 and a free port, stopped on exit
    (``.url``, ``.pid``)."""
    server = start_local_server(model_dir, server_args, env=env, timeout_s=timeout_s, launcher=launcher)
    try:
        yield server
    finally:
        server.stop()


def importable_from(directory: str) -> dict[str, str]:
    """The environment entry that lets a server process import the modules in ``directory`` (a test's
    logits processors and extensions)."""
    return {"PYTHONPATH": os.pathsep.join(filter(None, [directory, os.environ.get("PYTHONPATH")]))}


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus metric's samples on the server's ``/metrics`` that carry ``labels``."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as reply:
        text = reply.read().decode()
    total = 0.0
    for found, value in re.findall(rf"^{re.escape(name)}(?:{{([^}}]*)}})? (\S+)$", text, re.M):
        if all(f'{key}="{wanted}"' in found for key, wanted in labels.items()):
            total += float(value)
    return total


def collective_rpc(url: str, method: str) -> list:
    """Each worker's answer to ``method`` (as vLLM's ``POST /collective_rpc`` sends it: text), with
    ``VLLM_SERVER_DEV_MODE=1``."""
    request = urllib.request.Request(
        url + "/collective_rpc", data=json.dumps({"method": method}).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.load(reply)["results"]
