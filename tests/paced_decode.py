"""A logits processor for engine tests: a request whose ``vllm_xargs`` hold ``{PACE_KEY: seconds}`` makes
every engine step it takes part in last at least that long.

A tiny model on CPU decodes a thousand tokens in about a second, faster than a client can look at the
server and hang up; paced, a test that acts on a request mid-decode does not race the engine."""

import time

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

PACE_KEY = "test_pace_s"


class PacedDecode(LogitsProcessor):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self._paces: dict[int, float] = {}  # batch index -> seconds per step

    def is_argmax_invariant(self) -> bool:
        return False  # applied on greedy steps too

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(
            self._paces, batch_update, lambda params, _prompt_ids, _output_ids: (params.extra_args or {}).get(PACE_KEY)
        )

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self._paces:
            time.sleep(max(self._paces.values()))
        return logits
