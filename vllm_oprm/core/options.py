"""The ``oprm`` object of a server request, and the server-wide defaults behind it."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from .config import OPRMConfig
from .prompt import Context, Tokenizer

FIELDS = ("context", "chunk_size", "mode", "idk", "max_batch_tokens", "prefix_cache", "early_exit_entropy", "chunk_order")
# Server-wide settings; `vllm-oprm serve --oprm-chunk-size N` etc. set these. All but
# max_chunks and max_inflight_rows are defaults a request's `oprm` fields override.
ENV_DEFAULTS = {
    "chunk_size": "OPRM_CHUNK_SIZE",
    "max_batch_tokens": "OPRM_MAX_BATCH_TOKENS",
    "mode": "OPRM_MODE",
    "idk": "OPRM_IDK",  # a one-token text, or a JSON list of token ids
    "max_chunks": "OPRM_MAX_CHUNKS",  # the most chunk requests one request may become
    "prefix_cache": "OPRM_PREFIX_CACHE",  # true/false: block-aligned rows for vLLM's prefix cache
    "early_exit_entropy": "OPRM_EARLY_EXIT_ENTROPY",  # nats: stop reading chunks at a winner this confident
    "chunk_order": "OPRM_CHUNK_ORDER",  # forward or reverse: which chunks are read first
    "max_inflight_rows": "OPRM_MAX_INFLIGHT_ROWS",  # the most chunk rows in prefill at once, server-wide
}
INTEGER_SETTINGS = ("chunk_size", "max_batch_tokens", "max_chunks", "max_inflight_rows")
BOOLEAN_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
MAX_CHUNKS = 256  # with the paper's L=2000: contexts up to 512k tokens


def idk_setting(raw: str, source: str) -> str | list:
    """An IDK setting given as text (a flag or variable named ``source``): a word, or a JSON list of ids."""
    if not raw.startswith("["):
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        raise ValueError(f"{source} is neither a word nor a JSON list of token ids: {raw!r}") from None


def defaults_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Option defaults from ``OPRM_*`` variables; a bad value is a ValueError naming it."""
    environ = os.environ if environ is None else environ
    defaults: dict[str, Any] = {}
    for name, variable in ENV_DEFAULTS.items():
        raw = environ.get(variable, "").strip()
        if not raw:
            continue
        if name in INTEGER_SETTINGS:
            try:
                defaults[name] = int(raw)
            except ValueError:
                raise ValueError(f"{variable} must be an integer, got {raw!r}") from None
        elif name == "early_exit_entropy":
            try:
                defaults[name] = float(raw)
            except ValueError:
                raise ValueError(f"{variable} must be a number of nats, got {raw!r}") from None
        elif name == "idk":
            defaults[name] = idk_setting(raw, variable)
        elif name == "prefix_cache":
            if raw.lower() not in BOOLEAN_WORDS:
                raise ValueError(f"{variable} must be true or false, got {raw!r}")
            defaults[name] = BOOLEAN_WORDS[raw.lower()]
        else:
            defaults[name] = raw
    return defaults


def parse_options(options: Any, defaults: Mapping[str, Any], tokenizer: Tokenizer) -> tuple[Context, OPRMConfig]:
    """The context and ``OPRMConfig`` of one request: its ``oprm`` fields over ``defaults``.

    Every problem is a ValueError whose message starts with the field, e.g.
    ``oprm.chunk_size must be a positive integer, got 0``.
    """
    if not isinstance(options, dict):
        raise ValueError(f"oprm must be an object with fields {', '.join(FIELDS)}; got {type(options).__name__}")
    unknown = sorted(set(options) - set(FIELDS))
    if unknown:
        raise ValueError(f"oprm has unknown field(s) {', '.join(unknown)}; known: {', '.join(FIELDS)}")
    merged = {**defaults, **{key: value for key, value in options.items() if value is not None}}
    if merged.get("mode") == "summarize" and options.get("early_exit_entropy") is None:
        merged.pop("early_exit_entropy", None)  # a server-wide early exit does not apply to summarize requests
    context = merged.get("context")
    if isinstance(context, str):
        if not context.strip():
            raise ValueError("oprm.context is empty")
    elif not (isinstance(context, list) and context and all(isinstance(doc, str) for doc in context)):
        raise ValueError(f"oprm.context must be a string or a non-empty list of strings, got {context!r:.60}")
    try:
        config = OPRMConfig(
            chunk_size=merged.get("chunk_size", OPRMConfig.chunk_size),
            max_batch_tokens=merged.get("max_batch_tokens", OPRMConfig.max_batch_tokens),
            mode=merged.get("mode", OPRMConfig.mode),
            idk_token_ids=_idk_token_ids(merged.get("idk"), tokenizer),
            prefix_cache=merged.get("prefix_cache", OPRMConfig.prefix_cache),
            early_exit_entropy=merged.get("early_exit_entropy"),
            chunk_order=merged.get("chunk_order", OPRMConfig.chunk_order),
        )
    except ValueError as error:
        raise ValueError(f"oprm.{error}") from None
    return context, config


def _idk_token_ids(idk: Any, tokenizer: Tokenizer) -> tuple[int, ...]:
    if idk is None:
        return ()
    if isinstance(idk, str):
        ids = tokenizer.encode(idk, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"idk {idk!r} is {len(ids)} tokens {ids}; it must be exactly one token, or a list of token ids")
        return tuple(ids)
    if isinstance(idk, list) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in idk):
        return tuple(idk)
    raise ValueError(f"idk must be a one-token string or a list of non-negative token ids, got {idk!r:.60}")
