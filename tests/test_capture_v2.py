"""``FirstTokenEntropyV2`` driven through vLLM's own Model Runner V2 logits-processor objects.

The processor is built by V2's loader from a real ``RequestState`` (the runner's per-slot
buffers) wrapped in ``LogitsProcRequestState``, and fed real ``LogitsContext`` objects on
CPU tensors. ``RequestState``'s UVA buffers pin host memory, which needs an accelerator,
so the fixture takes the ``NonUvaBuffer`` fallback vLLM itself uses on platforms without
pinned memory; the processor reads only their host ``.np`` side.
"""

import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("vllm.v1.worker.gpu.sample.logits_processor.interface")

from vllm import SamplingParams  # noqa: E402
from vllm.exceptions import VLLMValidationError  # noqa: E402
from vllm.v1.sample.logits_processor import validate_logits_processors_parameters  # noqa: E402
from vllm.v1.worker.gpu import buffer_utils  # noqa: E402
from vllm.v1.worker.gpu.sample.logits_processor import (  # noqa: E402
    LogitsContext,
    build_custom_logits_processors,
    build_custom_logits_processors_params_validator,
)
from vllm.v1.worker.gpu.states import RequestState  # noqa: E402

from vllm_oprm.core.selection import first_token_entropy  # noqa: E402
from vllm_oprm.engine import capture  # noqa: E402
from vllm_oprm.engine.capture import CAPTURE_KEY, PROCESSOR  # noqa: E402
from vllm_oprm.engine.capture_v2 import PROCESSOR_V2, FirstTokenEntropyV2  # noqa: E402

VOCAB = 32


@pytest.fixture(autouse=True)
def records():
    capture._records.clear()
    yield capture._records
    capture._records.clear()


@pytest.fixture
def runner(monkeypatch):
    """The runner's request state and our processor, as V2's worker-side loader builds it."""
    monkeypatch.setattr(buffer_utils, "is_uva_available", lambda: False)
    req_states = RequestState(
        max_num_reqs=8, max_model_len=64, max_num_batched_tokens=64, num_speculative_steps=2,
        vocab_size=VOCAB, device=torch.device("cpu"),
    )
    (processor,) = build_custom_logits_processors(None, req_states, is_pooling_model=False, custom_logitsprocs=[PROCESSOR_V2])
    assert isinstance(processor, FirstTokenEntropyV2)
    return req_states, processor


def admit(runner, req_id, prompt_len, key=None, num_output=0):
    """Add a request the way V2's ``add_requests`` does: request state first, then the sampler's processors.

    ``num_output`` > 0 is a resumption after preemption: the refill carries those output tokens.
    """
    req_states, processor = runner
    req_states.add_request(req_id, prompt_len, list(range(prompt_len + num_output)), 0, max_tokens=8)
    slot = req_states.req_id_to_index[req_id]
    params = SamplingParams(extra_args={CAPTURE_KEY: key} if key else None)
    return slot, processor.add_request(slot, params)


def step(processor, batch, seed=0):
    """One ``apply`` call; ``batch`` holds (slot, positions of its logits rows[, seq_lens upper bound]).

    Without an explicit bound it is the last row's position + 1, exact as in V2 without
    speculative decoding. Returns the logits and checks they come back unmodified.
    """
    slots = [entry[0] for entry in batch]
    positions = [list(entry[1]) for entry in batch]
    bounds = [entry[2] if len(entry) > 2 else rows[-1] + 1 for entry, rows in zip(batch, positions)]
    ctx = LogitsContext(
        expanded_idx_mapping=torch.tensor([s for s, rows in zip(slots, positions) for _ in rows]),
        idx_mapping=torch.tensor(slots),
        idx_mapping_np=np.array(slots, dtype=np.intp),
        expanded_local_pos=torch.cat([torch.arange(len(rows), dtype=torch.int32) for rows in positions]),
        input_ids=torch.zeros(sum(map(len, positions)), dtype=torch.int64),
        pos=torch.tensor([p for rows in positions for p in rows]),
        seq_lens_upper_bound_np=np.array(bounds, dtype=np.int32),
    )
    logits = torch.randn(len(ctx.pos), VOCAB, generator=torch.Generator().manual_seed(seed))
    before = logits.clone()
    assert processor.apply(logits, ctx) is logits
    assert torch.equal(logits, before)
    return logits


def expected(logits, row):
    return pytest.approx(first_token_entropy(logits[row : row + 1]).item(), rel=1e-6), int(logits[row].argmax())


def test_records_marked_rows_only(runner, records):
    a, marked_a = admit(runner, "a", 5, key="key-a")
    b, marked_b = admit(runner, "b", 7)
    c, marked_c = admit(runner, "c", 3, key="key-c")
    assert (marked_a, marked_b, marked_c) == (True, False, True)
    logits = step(runner[1], [(c, [2]), (b, [6]), (a, [4])])  # all at their last prompt position
    assert set(records) == {"key-a", "key-c"}
    assert records["key-c"] == expected(logits, 0)
    assert records["key-a"] == expected(logits, 2)


def test_nothing_on_later_steps(runner, records, monkeypatch):
    slot, _ = admit(runner, "a", 5, key="key-a")
    step(runner[1], [(slot, [4])])
    records.clear()  # the front end popped it
    monkeypatch.setattr(runner[1], "_record", lambda *args: pytest.fail("touched logits on a decode step"))
    step(runner[1], [(slot, [5])])
    step(runner[1], [(slot, [6])])
    assert records == {}


def test_chunked_prefill_records_final_chunk(runner, records, monkeypatch):
    slot, _ = admit(runner, "a", 10, key="key-a")
    with monkeypatch.context() as patch:
        patch.setattr(runner[1], "_record", lambda *args: pytest.fail("a partial chunk reached the device"))
        step(runner[1], [(slot, [5])], seed=1)  # first chunk: prompt positions 0..5
    assert records == {}
    logits = step(runner[1], [(slot, [9])], seed=2)
    assert records == {"key-a": expected(logits, 0)}


def test_recycled_slot_forgets_marked_request(runner, records):
    req_states, processor = runner
    slot, _ = admit(runner, "a", 5, key="key-a")
    req_states.remove_request("a")  # finished or aborted before its first token
    recycled, marked = admit(runner, "b", 5)
    assert (recycled, marked) == (slot, False)
    step(processor, [(recycled, [4])])
    assert records == {}


def test_preemption_resume(runner, records):
    req_states, processor = runner
    with_output, marked = admit(runner, "a", 6, key="key-a", num_output=3)
    assert not marked  # its first token exists: the refill is prompt + 3 output tokens
    step(processor, [(with_output, [5], 6)])  # a refill chunk ending at the last prompt position
    step(processor, [(with_output, [8])])
    assert records == {}
    req_states.remove_request("a")
    slot, marked = admit(runner, "b", 6, key="key-b")  # preempted before its first token
    assert marked
    logits = step(processor, [(slot, [5])])
    assert records == {"key-b": expected(logits, 0)}


def test_spec_decode_uses_first_token_row(runner, records):
    decoding, _ = admit(runner, "a", 4)
    prefilling, _ = admit(runner, "b", 6, key="key-b")
    # The decode owns 3 rows (bonus + 2 drafts); so does the final prefill chunk with 2 drafts.
    logits = step(runner[1], [(decoding, [9, 10, 11]), (prefilling, [5, 6, 7])])
    assert records == {"key-b": expected(logits, 3)}


def test_spec_decode_upper_bound_overshoot(runner, records):
    slot, _ = admit(runner, "a", 10, key="key-a")
    step(runner[1], [(slot, [3, 4, 5], 10)], seed=1)  # bound reaches the prompt end, the rows do not
    assert records == {}
    logits = step(runner[1], [(slot, [9, 10, 11], 12)], seed=2)
    assert records == {"key-a": expected(logits, 0)}


@pytest.mark.parametrize("value", ["", 7, None, ["key"], "client-chosen"])
def test_validate_params_refuses_keys_oprm_did_not_issue(value):
    with pytest.raises(ValueError, match=f"{CAPTURE_KEY}.*reserved"):
        FirstTokenEntropyV2.validate_params(SamplingParams(extra_args={CAPTURE_KEY: value}))
    with pytest.raises(VLLMValidationError, match=CAPTURE_KEY):  # as vLLM's front end runs it
        build_custom_logits_processors_params_validator([PROCESSOR_V2])(SamplingParams(extra_args={CAPTURE_KEY: value}))


@pytest.mark.parametrize("processor", [PROCESSOR, PROCESSOR_V2])
def test_validate_params_admits_an_issued_key_once(processor):
    from vllm_oprm.engine.capture import issue_capture_key

    cls = load_class(processor)
    cls.validate_params(SamplingParams())
    cls.validate_params(SamplingParams(extra_args={"other": 1}))
    marked = SamplingParams(extra_args=issue_capture_key(f"issued-{processor}"))
    cls.validate_params(marked)
    with pytest.raises(ValueError, match="reserved"):  # a replay of the same key is a client's
        cls.validate_params(marked)


def load_class(fqcn):
    import importlib

    module, name = fqcn.split(":")
    return getattr(importlib.import_module(module), name)


def test_each_loader_takes_only_its_own_interface():
    """Why both classes exist: V2's loader refuses the V1 class, V1's the V2 class."""
    with pytest.raises(ValueError, match="not a subclass"):
        build_custom_logits_processors_params_validator([PROCESSOR])
    with pytest.raises(ValueError, match="subclass of LogitsProcessor"):
        validate_logits_processors_parameters([PROCESSOR_V2], SamplingParams())


def test_import_is_light():
    """The front end imports the module under test to validate params: no V1 sampler machinery."""
    code = (
        "import sys, vllm_oprm.engine.capture_v2; "
        "print([m for m in ('vllm_oprm.engine.capture', 'vllm.v1.sample.logits_processor') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
