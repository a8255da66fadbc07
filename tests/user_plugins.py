"""A user's own logits processor and worker extension, loaded by name by a server's engine: the tests
check that OPRM's processor and worker extension are added next to them, not in their place."""

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

applied = 0  # batches the processor saw, in this worker process


class CountingProcessor(LogitsProcessor):
    """Leaves the logits as they are and counts the batches it was applied to."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        pass

    def is_argmax_invariant(self) -> bool:
        return False  # vLLM skips argmax-invariant processors for greedy requests

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        global applied
        applied += 1
        return logits


class UserExtension:
    def user_processor_batches(self) -> int:
        return applied
