"""``OPRMLLM``: vLLM's offline ``LLM`` with OPRM prompts, all requests batched together."""

from __future__ import annotations

import itertools
from typing import Any, Sequence

from tqdm import tqdm
from vllm import LLM, SamplingParams
from vllm.outputs import RequestOutput
from vllm.sampling_params import RequestOutputKind

from ..core import OPRMConfig, OPRMPrompt
from ..plugin import require_supported_vllm
from .capture import PROCESSOR, TAKE_METHOD, merge_records, oprm_worker_extension, refuse_capture_key
from .children import ParentStream, child_params, cumulative
from .fanout import Actions, FanOut
from .layout import plan_request, prefix_cache_block
from .metrics import logger

_serial = itertools.count()


class OPRMLLM:
    """An ``LLM`` whose ``generate`` also takes ``OPRMPrompt``s.

    ``OPRMLLM(model=..., **llm_kwargs)`` builds the ``LLM`` with OPRM's entropy
    processor and worker extension (after, and mixed into, the caller's own).
    Every request, OPRM or plain, goes into the
    engine at once and is scheduled by vLLM's continuous batching; each OPRM
    prompt becomes one engine request per chunk. Results are ``RequestOutput``s
    in prompt order with an extra ``.oprm`` (``Selection``: ``num_chunks``,
    ``selected_chunk``, ``entropies``; None for plain prompts).
    """

    def __init__(self, **llm_kwargs: Any):
        require_supported_vllm()
        processors = list(llm_kwargs.pop("logits_processors", None) or [])
        llm_kwargs["logits_processors"] = [*processors, PROCESSOR]
        llm_kwargs["worker_extension_cls"] = oprm_worker_extension(llm_kwargs.get("worker_extension_cls"))
        self.llm = LLM(**llm_kwargs)
        self.engine = self.llm.llm_engine
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = self.engine.model_config.max_model_len
        self.cache_block_size = prefix_cache_block(self.engine.vllm_config)

    def generate(
        self,
        prompts: OPRMPrompt | str | Sequence[Any],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        oprm: OPRMConfig | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        if isinstance(prompts, (OPRMPrompt, str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"sampling_params has {len(sampling_params)} entries for {len(prompts)} prompts")
        oprm = oprm or OPRMConfig()
        # Lay out and validate everything before the engine sees any of it.
        for prompt, params in zip(prompts, sampling_params):
            if not isinstance(prompt, OPRMPrompt):  # plan_request checks the OPRM ones
                refuse_capture_key(params)
        plans = [
            plan_request(p, sp, oprm, self.tokenizer, self.max_model_len, cache_block_size=self.cache_block_size)
            if isinstance(p, OPRMPrompt)
            else None
            for p, sp in zip(prompts, sampling_params)
        ]
        results: list[RequestOutput | None] = [None] * len(prompts)
        active: dict[int, tuple[FanOut, SamplingParams]] = {}  # prompt index -> its fan-out
        children: dict[str, int] = {}  # child request id -> prompt index
        plain: dict[str, int] = {}
        bar = tqdm(total=len(prompts), desc="OPRM requests", disable=not use_tqdm)
        try:
            for index, (prompt, params, layout) in enumerate(zip(prompts, sampling_params, plans)):
                request_id = f"oprm-{next(_serial)}"
                if layout is None:
                    plain[request_id] = index
                    self.engine.add_request(request_id, prompt, cumulative(params))
                else:
                    active[index] = (FanOut(request_id, layout, oprm), params)
                    self._apply(index, active[index], active[index][0].start(), children)
            while self.engine.has_unfinished_requests():
                ready: set[int] = set()
                for out in self.engine.step():
                    if out.request_id in plain:
                        if out.finished:
                            out.oprm = None
                            results[plain.pop(out.request_id)] = out
                            bar.update(1)
                    elif out.request_id in children:  # a chunk request (FanOut ignores a loser's last output)
                        index = children[out.request_id]
                        fanout = active[index][0]
                        chunk = fanout.chunk_of(out.request_id)
                        self._apply(index, active[index], fanout.on_output(chunk, out), children)
                        if fanout.score_keys():
                            ready.add(index)
                self._score(sorted(ready), active, children)
                for index in [i for i, (fanout, _) in active.items() if fanout.done()]:
                    fanout, _ = active.pop(index)
                    results[index] = ParentStream(fanout, RequestOutputKind.CUMULATIVE)()
                    bar.update(1)
        except BaseException:
            self._abandon([fanout for fanout, _ in active.values()], list(plain))
            raise
        finally:
            bar.close()
        return results

    def _abandon(self, fanouts: list[FanOut], plain: list[str]) -> None:
        """After an error (or an interrupt) in the loop: abort every request still running and drop
        the first-token records nobody will read, so the engine can serve the next call."""
        try:
            live = [cid for fanout in fanouts for cid in fanout.live_children()] + plain
            if live:
                self.engine.abort_request(live)
            unscored = [cid for fanout in fanouts for cid in fanout.unscored_children()]
            if unscored:
                self.llm.collective_rpc(TAKE_METHOD, args=(unscored,))
        except Exception:  # noqa: BLE001 - the engine is gone; the error being raised says why
            logger.warning("OPRM could not clean up after an error: the engine did not answer", exc_info=True)

    def _apply(self, index: int, owner: tuple[FanOut, SamplingParams], actions: Actions, children) -> None:
        fanout, params = owner
        if actions.abort:
            self.engine.abort_request([fanout.child_id(c) for c in actions.abort])
        for chunk in actions.add:
            child_id = fanout.child_id(chunk)
            children[child_id] = index
            self.engine.add_request(
                child_id,
                {"prompt_token_ids": fanout.prompt_ids(chunk)},
                child_params(params, fanout, chunk, self.max_model_len),
            )

    def _score(self, ready: list[int], active, children) -> None:
        """Fetch (entropy, argmax) of every ready batch in one worker round trip."""
        if not ready:
            return
        keys = [key for index in ready for key in active[index][0].score_keys()]
        records = merge_records(self.llm.collective_rpc(TAKE_METHOD, args=(keys,)))
        for index in ready:
            self._apply(index, active[index], active[index][0].on_records(records), children)
