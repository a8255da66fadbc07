"""The OPRM prompt layout: prefix P, context C, suffix S, tokenized part by part."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, Union

TokenIds = list[int]
Part = Union[str, Sequence[int]]
Context = Union[str, Sequence[int], Sequence[str], Sequence[Sequence[int]]]
PLACEHOLDER = "{{context}}"  # where a server request's context goes in its prompt


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


def _is_token_ids(value: object) -> bool:
    # type() rather than isinstance(): bools are not ids; a set of types is fast on 100k-token contexts.
    return isinstance(value, (list, tuple)) and set(map(type, value)) <= {int}


def _check_token_ids(name: str, ids: Sequence[int]) -> TokenIds:
    if ids and min(ids) < 0:
        raise ValueError(f"{name} holds a negative token id {next(t for t in ids if t < 0)}")
    return list(ids)


def _encode_part(name: str, part: Part, tokenizer: Tokenizer | None, add_special_tokens: bool) -> TokenIds:
    if isinstance(part, str):
        if tokenizer is None:
            raise ValueError(f"{name} is text but no tokenizer was given")
        return list(tokenizer.encode(part, add_special_tokens=add_special_tokens))
    if _is_token_ids(part):
        return _check_token_ids(name, part)
    raise ValueError(f"{name} must be a string or a list of token ids, got {type(part).__name__}")


@dataclass(frozen=True)
class TokenizedPrompt:
    """Token ids of P and S, and the context as one or more documents."""

    prefix_ids: TokenIds
    documents: list[TokenIds]
    suffix_ids: TokenIds

    @property
    def context_ids(self) -> TokenIds:
        return [t for doc in self.documents for t in doc]

    @property
    def vanilla_ids(self) -> TokenIds:
        """The whole prompt as one sequence: what a vanilla request sends."""
        return self.prefix_ids + self.context_ids + self.suffix_ids


@dataclass(frozen=True)
class OPRMPrompt:
    """A prompt split into prefix (chat header + instruction), context and suffix.

    Each part is a string or a list of token ids; ``context`` may also be a list
    of documents (strings or token-id lists), packed whole into chunks. Parts are
    tokenized separately so that no chunk boundary splits a prefix or suffix
    token. The prefix gets the tokenizer's special tokens (BOS) as a plain prompt
    would; context and suffix get none.
    """

    @classmethod
    def from_template(cls, template: str, context: Context) -> "OPRMPrompt":
        """Split ``template`` at its one ``{{context}}`` placeholder."""
        count = template.count(PLACEHOLDER)
        if count != 1:
            raise ValueError(f"the prompt must contain the placeholder {PLACEHOLDER} exactly once, found {count}")
        prefix, suffix = template.split(PLACEHOLDER)
        return cls(prefix, context, suffix)

    prefix: Part
    context: Context
    suffix: Part

    def tokenize(self, tokenizer: Tokenizer | None = None, add_special_tokens: bool = True) -> TokenizedPrompt:
        """``add_special_tokens`` applies to the prefix only: False for a rendered
        chat prompt, whose template already wrote them (as vLLM's chat API does)."""
        prefix_ids = _encode_part("prefix", self.prefix, tokenizer, add_special_tokens=add_special_tokens)
        suffix_ids = _encode_part("suffix", self.suffix, tokenizer, add_special_tokens=False)
        context = self.context
        if isinstance(context, str) or _is_token_ids(context):
            documents = [_encode_part("context", context, tokenizer, add_special_tokens=False)]
        elif isinstance(context, (list, tuple)) and context:
            documents = [
                _encode_part(f"context[{i}]", doc, tokenizer, add_special_tokens=False)
                for i, doc in enumerate(context)
            ]
        else:
            raise ValueError(
                "context must be a string, a list of token ids or a non-empty list of documents, "
                f"got {context!r:.80}"
            )
        documents = [doc for doc in documents if doc]
        if not documents:
            raise ValueError("context is empty")
        return TokenizedPrompt(prefix_ids, documents, suffix_ids)
