"""OPRM chunk requests: prime vLLM's incremental detokenizer with the prompt's tail, not the whole row.

vLLM 0.32.0's ``FastIncrementalDetokenizer`` primes tokenizers' ``DecodeStream``
with the request's whole prompt, and its first step decodes all of it: a cost
linear in the prompt, per request (3 ms per 2000-token row on the CPU used
here). OPRM sends one request per chunk, so a question on a 128k-token document
pays for decoding 128k prompt tokens even when vLLM's prefix cache supplies every
chunk state. The stream needs only a few tokens before the first new one to
print it exactly as with the whole prompt (after that first step it keeps a
short window anyway), so requests marked as OPRM chunks are primed with their
last ``PROMPT_TAIL`` tokens. Every other request is untouched.
"""

from __future__ import annotations

from . import check_target

TARGET_VLLM = ("0.32.0", "0.33.0")
PROMPT_TAIL = 8  # covers a UTF-8 character split over up to 4 byte tokens, with room to spare
_applied = False


def apply(marker_key: str) -> None:
    """Patch requests whose ``SamplingParams.extra_args`` hold ``marker_key`` (idempotent)."""
    global _applied
    check_target(
        "detokenizer_prompt_tail", TARGET_VLLM, "check how the fast incremental detokenizer is primed before re-targeting"
    )
    if _applied:
        return
    import tokenizers.decoders
    from vllm.v1.engine import detokenizer

    original_init = detokenizer.FastIncrementalDetokenizer.__init__

    def init_primed_with_prompt_tail(self, tokenizer, request):
        original_init(self, tokenizer, request)
        if marker_key in (request.sampling_params.extra_args or {}):
            self.stream = tokenizers.decoders.DecodeStream(
                ids=request.prompt_token_ids[-PROMPT_TAIL:], skip_special_tokens=self.skip_special_tokens
            )

    detokenizer.FastIncrementalDetokenizer.__init__ = init_primed_with_prompt_tail
    _applied = True
