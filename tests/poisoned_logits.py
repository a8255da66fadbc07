"""A logits processor for engine tests: NaN first-token logits for requests whose prompt holds ``POISON_ID``.

Loaded by the engine's worker through ``logits_processors`` (ahead of OPRM's entropy
processor, which then records a NaN entropy for those chunk rows)."""

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from vllm_oprm.testing import UNK_ID

POISON_ID = UNK_ID  # the word-level test tokenizer's <unk>: no generated test prompt holds it


class PoisonFirstTokens(LogitsProcessor):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self._rows: dict[int, list[int]] = {}  # batch index -> live output tokens

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(
            self._rows, batch_update, lambda _params, prompt_ids, output_ids: output_ids if POISON_ID in prompt_ids else None
        )

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        rows = [index for index, output_ids in self._rows.items() if not output_ids]
        if rows:
            logits[rows] = float("nan")
        return logits
