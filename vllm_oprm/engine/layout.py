"""From an OPRM prompt and sampling parameters to validated chunk rows."""

from __future__ import annotations

from ..core import ChunkRows, OPRMConfig, OPRMPrompt, build_rows


def plan_request(prompt: OPRMPrompt, params, config: OPRMConfig, tokenizer, max_model_len: int) -> ChunkRows:
    """Chunk rows of one request, or a ValueError saying what is wrong with it."""
    if config.mode != "summarize":
        if getattr(params, "n", 1) != 1:
            raise ValueError(f"n={params.n} is not supported with OPRM mode {config.mode!r}: one chunk answers")
        best_of = getattr(params, "best_of", None)
        if best_of not in (None, 1):
            raise ValueError(f"best_of={best_of} is not supported with OPRM mode {config.mode!r}")
    elif getattr(params, "n", 1) != 1:
        raise ValueError(f"n={params.n} is not supported with OPRM mode 'summarize'")
    layout = build_rows(prompt.tokenize(tokenizer), config)
    vocab = len(tokenizer)
    max_tokens = getattr(params, "max_tokens", None) or 0
    for row in layout.rows:
        bad = next((t for t in row if t >= vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary ({vocab})")
        if len(row) + max_tokens > max_model_len:
            raise ValueError(
                f"a chunk row is {len(row)} tokens (prefix + chunk + suffix) and max_tokens is {max_tokens}, "
                f"over the model's max_model_len {max_model_len}; lower chunk_size or shorten prefix/suffix"
            )
    return layout
