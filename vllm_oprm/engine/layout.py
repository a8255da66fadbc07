"""From an OPRM prompt and sampling parameters to validated chunk rows."""

from __future__ import annotations

from ..core import ChunkRows, OPRMConfig, OPRMPrompt, build_rows, check_vocabulary
from .capture import refuse_capture_key


def prefix_cache_block(vllm_config) -> int | None:
    """The block size at which the engine caches recurrent states, or None when it does not.

    vLLM keeps Mamba states for prefix caching only in its "align" cache mode,
    which it turns on with ``enable_prefix_caching`` for models that support it.
    """
    cache = vllm_config.cache_config
    if not cache.enable_prefix_caching or cache.mamba_cache_mode != "align":
        return None
    return cache.mamba_block_size


def plan_request(
    prompt: OPRMPrompt,
    params,
    config: OPRMConfig,
    tokenizer,
    max_model_len: int,
    add_special_tokens: bool = True,
    cache_block_size: int | None = None,
) -> ChunkRows:
    """Chunk rows of one request, or a ValueError saying what is wrong with it.

    ``params`` needs ``n``, ``best_of``, ``max_tokens`` and ``extra_args`` (SamplingParams or alike);
    ``add_special_tokens`` is False for a rendered chat prompt; ``cache_block_size``
    is the engine's ``prefix_cache_block``."""
    refuse_capture_key(params)
    if getattr(params, "n", 1) != 1:
        raise ValueError(f"n={params.n} is not supported with OPRM mode {config.mode!r}: one sequence per chunk")
    best_of = getattr(params, "best_of", None)
    if config.mode != "summarize" and best_of not in (None, 1):
        raise ValueError(f"best_of={best_of} is not supported with OPRM mode {config.mode!r}")
    if config.prefix_cache and cache_block_size is None:
        raise ValueError(
            "prefix_cache needs vLLM's prefix cache of recurrent states: start the engine with "
            "enable_prefix_caching=True (--enable-prefix-caching) on a model that supports it (Mamba2, Mamba, RWKV6, RecurrentGemma)"
        )
    block = cache_block_size if config.prefix_cache else None
    layout = build_rows(prompt.tokenize(tokenizer, add_special_tokens), config, block)
    check_vocabulary(layout.rows, len(tokenizer))
    outside = [t for t in config.idk_token_ids if t >= len(tokenizer)]
    if outside:
        raise ValueError(f"idk token ids {outside} are outside the vocabulary of {len(tokenizer)} tokens")
    max_tokens = getattr(params, "max_tokens", None) or 0
    for row in layout.rows:
        if len(row) + max_tokens > max_model_len:
            raise ValueError(
                f"a chunk row is {len(row)} tokens (prefix + chunk + suffix) and max_tokens is {max_tokens}, "
                f"over the model's max_model_len {max_model_len}; lower chunk_size or shorten prefix/suffix"
            )
    return layout
