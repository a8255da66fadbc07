"""Exact first-token entropy for vLLM's Model Runner V2 (V2 logits-processor interface).

Same contract as ``capture.FirstTokenEntropy``, which implements the V1
interface: for a request whose ``SamplingParams.extra_args[CAPTURE_KEY]`` holds
a key, the (entropy, argmax) of its float32 first-token logits land in
``capture._records[key]`` for ``OPRMWorkerExtension.oprm_take_first_tokens``;
logits are never modified. Both classes exist because each runner's loader
takes only subclasses of its own interface.

V2 runs custom processors after its built-in logit bias, penalties, bad words
and grammar stages and before temperature, so the entropy is of those logits
(V1 runs ours before penalties); with no penalties, bias, bad words or grammar
they are the raw logits.

Import-light, as V2 asks: the front end imports this module to call
``validate_params``, so torch work and OPRM's V1-side modules load only inside
the worker-side methods.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor

if TYPE_CHECKING:
    import torch
    from vllm.sampling_params import SamplingParams
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcRequestState

PROCESSOR_V2 = "vllm_oprm.engine.capture_v2:FirstTokenEntropyV2"


class FirstTokenEntropyV2(LogitsProcessor):
    """Records (entropy, argmax) of a marked request's first-token logits.

    Host-side state per request slot: the capture key, the prompt length and
    whether the first token is still to come. The host picks a step's candidate
    requests from that state and ``ctx.seq_lens_upper_bound_np``; the device
    only confirms the row and computes the two numbers for those requests.
    """

    def __init__(self, vllm_config, req_states: LogitsProcRequestState):
        self._req_states = req_states
        self._keys: list[str | None] = [None] * req_states.max_num_reqs
        self._prompt_len = np.zeros(req_states.max_num_reqs, dtype=np.int64)
        self._awaiting = np.zeros(req_states.max_num_reqs, dtype=bool)

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Refuse a capture key OPRM's front end did not issue (``capture.admit_capture_key``)."""
        from .capture import admit_capture_key

        admit_capture_key(sampling_params)

    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        """(Re)initialise the slot; True only for a marked request with no output yet.

        The runner has set the slot's ``prompt_len`` and ``prefill_len`` by now.
        A request resumed after preemption refills its output tokens too
        (``prefill_len > prompt_len``), so its first token already exists. V2
        calls ``apply`` only for batches where some request's processors
        returned True, and keeps that flag for the request's lifetime: a
        tracked request's later steps still pay V2's fp32 logits copy, though
        nothing in this class.
        """
        from .capture import CAPTURE_KEY

        key = (sampling_params.extra_args or {}).get(CAPTURE_KEY)
        prompt_len = int(self._req_states.prompt_len.np[req_idx])
        awaiting = key is not None and int(self._req_states.prefill_len.np[req_idx]) == prompt_len
        self._keys[req_idx] = key
        self._prompt_len[req_idx] = prompt_len
        self._awaiting[req_idx] = awaiting
        return awaiting

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        """Record the first-token rows of this step's awaiting requests; logits pass through.

        A request can sample its first token only in a step whose sequence
        reaches the end of its prompt. ``seq_lens_upper_bound_np`` never
        undercounts, so partial prefill chunks drop out on the host (exactly,
        without spec decoding) and steps without candidates touch no tensor.
        """
        slots = ctx.idx_mapping_np
        reaches_prompt_end = ctx.seq_lens_upper_bound_np[: len(slots)] >= self._prompt_len[slots]
        candidates = slots[self._awaiting[slots] & reaches_prompt_end]
        if len(candidates):
            self._record(logits, ctx, candidates)
        return logits

    def _record(self, logits: torch.Tensor, ctx: LogitsContext, slots: np.ndarray) -> None:
        """Find each slot's first-token row on the device and record it; one small copy back.

        The first token is sampled from the row fed the last prompt position
        (``pos == prompt_len - 1``). Under spec decoding a request owns several
        rows (``expanded_idx_mapping``): that row, then one per draft token;
        only it matches, the draft rows are skipped. A slot with no matching
        row (a partial chunk that passed the host bound) stays awaiting.
        """
        import torch
        from vllm.utils.torch_utils import async_tensor_h2d

        from ..core.selection import first_token_entropy
        from .capture import _records

        wanted = async_tensor_h2d(np.stack([slots, self._prompt_len[slots] - 1]), device=logits.device)
        # [slots, rows]: True where a row is the slot's and was fed its last prompt position.
        match = (ctx.expanded_idx_mapping == wanted[0, :, None]) & (ctx.pos == wanted[1, :, None])
        first_token_rows = logits.index_select(0, match.int().argmax(dim=1))
        summary = [match.any(dim=1), first_token_entropy(first_token_rows), first_token_rows.argmax(dim=-1)]
        found, entropies, argmaxes = torch.stack([column.double() for column in summary]).tolist()
        for slot, hit, entropy, argmax in zip(slots.tolist(), found, entropies, argmaxes):
            if hit:
                _records[self._keys[slot]] = (entropy, int(argmax))
                self._awaiting[slot] = False
