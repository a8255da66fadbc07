"""Exact first-token entropy inside vLLM's worker, read back through ``collective_rpc``.

A chunk request carries ``SamplingParams.extra_args[CAPTURE_KEY] = <key>``. The
logits processor below (the V1 runner's interface; ``capture_v2`` holds its
Model Runner V2 twin, and ``patches/runner_logits_processor.py`` gives the
engine the one for the runner vLLM picks) sees the float32 logits of every row
before penalties and temperature, and for a marked row that has not produced a
token yet it records the full-vocabulary entropy and argmax under that key. Rows in a
partial (chunked) prefill are overwritten by the final prefill step, and once
the first token exists the row is left alone, so later decode steps cost
nothing and carry no vocabulary-sized payload. The front end pops the records
with ``collective_rpc("oprm_take_first_tokens", args=(keys,))``, answered by the
worker extension below: only (entropy, argmax) pairs travel.
"""

from __future__ import annotations

import functools

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from ..core.selection import first_token_entropy

CAPTURE_KEY = "oprm_capture"
PROCESSOR = "vllm_oprm.engine.capture:FirstTokenEntropy"
WORKER_EXTENSION = "vllm_oprm.engine.capture.OPRMWorkerExtension"

# key -> (entropy, argmax); one dict per worker process, filled by the processor.
_records: dict[str, tuple[float, int]] = {}
# Capture keys this front-end process gave its own chunk requests, not yet admitted by vLLM.
_issued: set[str] = set()


def issue_capture_key(key: str) -> dict[str, str]:
    """``extra_args`` entry that marks an OPRM chunk request; admitted once by ``admit_capture_key``."""
    _issued.add(key)
    return {CAPTURE_KEY: key}


def withdraw_capture_keys(keys: list[str]) -> None:
    """Forget keys issued for requests that were never submitted (the fan-out ended first)."""
    _issued.difference_update(keys)


RESERVED_KEY_ERROR = f"extra_args key {CAPTURE_KEY!r} is reserved for OPRM's chunk requests"


def refuse_capture_key(params) -> None:
    """A caller's own parameters may not carry ``CAPTURE_KEY`` (checked by OPRM before vLLM sees them)."""
    if CAPTURE_KEY in (getattr(params, "extra_args", None) or {}):
        raise ValueError(RESERVED_KEY_ERROR)


def admit_capture_key(sampling_params) -> None:
    """Both processors' ``validate_params``: vLLM runs it in the front end at admission.

    Only OPRM's own chunk requests may carry ``CAPTURE_KEY``: a client could set
    it through ``vllm_xargs`` and have records written that nobody reads, so a
    key this process did not issue is refused (HTTP 400 from the server, a
    ``ValueError`` offline). An issued key is admitted once.
    """
    extra = sampling_params.extra_args or {}
    if CAPTURE_KEY not in extra:
        return
    key = extra[CAPTURE_KEY]
    if not isinstance(key, str) or key not in _issued:
        raise ValueError(RESERVED_KEY_ERROR)
    _issued.discard(key)


class FirstTokenEntropy(LogitsProcessor):
    """Records (entropy, argmax) of a marked request's first-token logits."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self._rows: dict[int, tuple[str, list[int]]] = {}  # batch index -> (key, live output tokens)

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        admit_capture_key(sampling_params)

    def is_argmax_invariant(self) -> bool:
        return False  # so it runs for greedy batches too; it never changes the logits

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        def track(params, _prompt_ids, output_ids):
            extra = params.extra_args or {}
            return (extra[CAPTURE_KEY], output_ids) if CAPTURE_KEY in extra else None

        process_dict_updates(self._rows, batch_update, track)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        pending = [(index, key) for index, (key, output_ids) in self._rows.items() if not output_ids]
        if not pending:
            return logits
        indices = torch.tensor([index for index, _ in pending], device=logits.device)
        rows = logits.index_select(0, indices)
        entropies = first_token_entropy(rows).tolist()
        argmaxes = rows.argmax(dim=-1).tolist()
        for (_, key), entropy, argmax in zip(pending, entropies, argmaxes):
            _records[key] = (entropy, argmax)
        return logits


TAKE_METHOD = "oprm_take_first_tokens"


def merge_records(replies: list[dict[str, tuple[float, int]]]) -> dict[str, tuple[float, int]]:
    """One dict from every worker's reply to ``TAKE_METHOD``: each worker answers for the
    rows it sampled (tensor-parallel ranks answer alike)."""
    return {key: record for reply in replies for key, record in reply.items()}


async def take_records_from_every_engine(engine_client, keys: list[str]) -> dict[str, tuple[float, int]]:
    """Pop ``keys``' records from every engine of an ``AsyncLLM``.

    Under data parallelism vLLM spreads one request's chunk rows over its
    engines, and ``AsyncLLM.collective_rpc`` answers with the first engine's
    workers only, so the call goes to each engine core (one per data-parallel
    rank; a single one otherwise).
    """
    per_engine = await engine_client.engine_core.call_utility_all_async("collective_rpc", TAKE_METHOD, None, (keys,), None)
    return merge_records([reply for workers in per_engine for reply in workers])


class OPRMWorkerExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``)."""

    def oprm_take_first_tokens(self, keys: list[str]) -> dict[str, tuple[float, int]]:
        """Pop and return the records of ``keys`` that exist."""
        return {key: _records.pop(key) for key in keys if key in _records}

    def oprm_num_records(self) -> int:
        """How many first-token records wait to be taken (none once every request has ended)."""
        return len(_records)


# vLLM takes one worker-extension class name. A user's own extension is kept by naming a class that
# mixes both in: ``<this module>.OPRMWorkerExtensionWith:<the user's dotted name, dots as colons>``,
# which vLLM resolves with ``getattr`` on this module in every worker process.
_WITH = "OPRMWorkerExtensionWith:"


def oprm_worker_extension(user_extension: str | None) -> str:
    """The ``worker_extension_cls`` giving workers OPRM's methods and, if one is named, the user's."""
    if not user_extension:
        return WORKER_EXTENSION
    if is_oprm_worker_extension(user_extension):
        return user_extension
    return f"{__name__}.{_WITH}{user_extension.replace('.', ':')}"


def is_oprm_worker_extension(name: str | None) -> bool:
    return name == WORKER_EXTENSION or (name or "").startswith(f"{__name__}.{_WITH}")


@functools.cache
def _with_user_extension(user_extension: str) -> type:
    from vllm.utils.import_utils import resolve_obj_by_qualname

    user = resolve_obj_by_qualname(user_extension)
    return type(f"OPRMWorkerExtensionWith{user.__name__}", (OPRMWorkerExtension, user), {})


def __getattr__(name: str):
    if name.startswith(_WITH):
        return _with_user_extension(name[len(_WITH):].replace(":", "."))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
