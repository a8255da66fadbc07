"""OPRM generation on a transformers (or torch RWKV6 or RWKV7) model: the exact reference."""

from __future__ import annotations

from typing import Sequence, Union

import torch

from ..core import ChunkSelector, OPRMConfig, OPRMOutput, OPRMPrompt, build_rows, check_vocabulary, first_token_entropy
from .states import FamilyBackend, RowState, backend_for


class Sampler:
    """Greedy at temperature 0, else temperature + nucleus (top-p) sampling."""

    def __init__(self, temperature: float, top_p: float, seed: int | None, device):
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.temperature, self.top_p = temperature, top_p
        self.generator = torch.Generator(device=device)
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        if self.temperature == 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        if self.top_p < 1:
            sorted_probs, order = torch.sort(probs, descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs >= self.top_p  # keep the token that crosses top_p
            probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
        return int(torch.multinomial(probs, 1, generator=self.generator))


class OPRMGenerator:
    """Speculative prefill of every ``[P, C_i, S]`` row in token-budgeted batches,
    selection by first-token entropy, and decoding from the selected row's state.

    ``model`` is a transformers ``MambaForCausalLM``, ``FalconMambaForCausalLM``,
    ``Mamba2ForCausalLM``, ``RecurrentGemmaForCausalLM`` or the torch
    ``vllm_oprm.reference.rwkv6.Rwkv6ForCausalLM`` or ``...rwkv7.Rwkv7ForCausalLM`` (batched family
    backends), or any other transformers causal LM (the slow, exact generic backend); ``tokenizer`` a transformers
    tokenizer (or anything with ``encode``/``decode`` when prompts are text).
    """

    def __init__(self, model: torch.nn.Module, tokenizer=None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        pad = getattr(tokenizer, "pad_token_id", None)
        self.backend: FamilyBackend = backend_for(model, pad if pad is not None else 0)
        self.vocab_size = int(model.config.vocab_size)

    @torch.no_grad()
    def generate(
        self,
        prompt: Union[OPRMPrompt, str, Sequence[int]],
        config: OPRMConfig | None = None,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        eos_token_id: int | None = None,
    ) -> OPRMOutput:
        """Answer one prompt. A plain string or token list is a vanilla request
        (one row, no chunking). ``eos_token_id`` defaults to the tokenizer's."""
        config = config or OPRMConfig()
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if eos_token_id is None:
            eos_token_id = getattr(self.tokenizer, "eos_token_id", None)
        sampler = Sampler(temperature, top_p, seed, self.backend.device)
        rows, batches = self._layout(prompt, config)

        def decode(row: RowState, first_logits: torch.Tensor) -> list[int]:
            return self._decode(row, first_logits, sampler, max_new_tokens, eos_token_id)

        selector = ChunkSelector(len(rows), config.idk_token_ids, config.early_exit_entropy)
        answers: list[list[int]] = []
        winner: tuple[RowState, torch.Tensor] | None = None
        for batch in batches:
            logits, batch_state = self.backend.prefill([rows[i] for i in batch])
            entropies = first_token_entropy(logits).tolist()
            for position, chunk in enumerate(batch):
                selector.add(chunk, entropies[position], int(torch.argmax(logits[position])))
                if config.mode == "summarize":
                    answers.append(decode(self.backend.take(batch_state, position), logits[position]))
            if config.mode != "summarize" and selector.winner in batch:
                position = batch.index(selector.winner)
                winner = (self.backend.take(batch_state, position), logits[position])
            del batch_state  # every state but the winner's is released here
            if selector.confident() and batch is not batches[-1]:
                selector.stop_early()  # early exit: the later batches are never prefilled
                break
        selection = selector.result()
        if config.mode != "summarize":
            answers = [decode(*winner)]
        texts = [self._detokenize(a) for a in answers]
        return OPRMOutput(
            text=config.summary_separator.join(texts) if config.mode == "summarize" else texts[0],
            token_ids=[t for a in answers for t in a],
            num_chunks=selection.num_chunks,
            selected_chunk=None if config.mode == "summarize" else selection.selected_chunk,
            entropies=selection.entropies,
            chunk_texts=texts if config.mode == "summarize" else [],
            stopped_early=selection.stopped_early,
        )

    def _layout(self, prompt, config: OPRMConfig) -> tuple[list[list[int]], list[list[int]]]:
        if isinstance(prompt, OPRMPrompt):
            chunk_rows = build_rows(prompt.tokenize(self.tokenizer), config)
            rows, batches = chunk_rows.rows, chunk_rows.batches
        else:  # vanilla: the whole prompt is one row
            rows = [self._encode(prompt)]
            batches = [[0]]
        check_vocabulary(rows, self.vocab_size)
        return rows, batches

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt is text but no tokenizer was given")
            ids = list(self.tokenizer.encode(prompt))
        else:
            ids = list(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        return ids

    def _decode(self, row, first_logits, sampler, max_new_tokens, eos_token_id) -> list[int]:
        tokens = [sampler(first_logits)]
        while len(tokens) < max_new_tokens and tokens[-1] != eos_token_id:
            tokens.append(sampler(self.backend.step(row, tokens[-1])))
        return tokens

    def _detokenize(self, tokens: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(tokens, skip_special_tokens=True)
