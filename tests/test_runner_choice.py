"""The entropy processor follows the model runner vLLM picks (``patches/runner_logits_processor.py``).

Each case builds vLLM's real engine config (``EngineArgs.create_engine_config``, as ``LLM`` and
``vllm serve`` do) in a fresh interpreter with OPRM's plugin loaded by vLLM, and reads which
processor the engine would load. No engine starts: Model Runner V2 needs Triton, which vLLM's CPU
build disables (for V2 cases the config is told Triton is there, as on CUDA), so V2 itself is
exercised through its own interface in ``test_capture_v2.py``.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm")

from vllm_oprm.engine.capture import PROCESSOR  # noqa: E402
from vllm_oprm.engine.capture_v2 import PROCESSOR_V2  # noqa: E402
from vllm_oprm.testing import build_model_dir  # noqa: E402

NGRAM = {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("mamba2"))
    build_model_dir("mamba2", path)
    return path


def engine_config(model_dir, runner_env, **engine_args):
    """``(use_v2_model_runner, logits_processors)`` of the config vLLM builds, or ``("error", message)``."""
    script = f"""
import json
import vllm.config.vllm
from vllm.engine.arg_utils import EngineArgs
if {runner_env == "1"!r}:  # vLLM 0.32's config refuses V2 where Triton is absent: pretend a CUDA machine's Triton
    vllm.config.vllm.HAS_TRITON = True
args = EngineArgs(model={model_dir!r}, dtype="float32", max_model_len=512, **json.loads({json.dumps(engine_args)!r}))
try:
    config = args.create_engine_config()
    print(json.dumps([config.use_v2_model_runner, config.model_config.logits_processors]))
except ValueError as exc:
    print(json.dumps(["error", str(exc)]))
"""
    env = {k: v for k, v in os.environ.items() if k != "VLLM_USE_V2_MODEL_RUNNER"}
    if runner_env is not None:
        env["VLLM_USE_V2_MODEL_RUNNER"] = runner_env
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


OTHER = "vllm.v1.sample.logits_processor.builtin:MinTokensLogitsProcessor"  # a user's own processor stays


@pytest.mark.parametrize(
    "runner_env,expected",
    [(None, [False, [OTHER, PROCESSOR]]), ("0", [False, [OTHER, PROCESSOR]]), ("1", [True, [OTHER, PROCESSOR_V2]])],
    ids=["cpu default (V1, no Triton)", "V1 asked for", "V2 asked for"],
)
def test_the_processor_matches_the_runner(model_dir, runner_env, expected):
    assert engine_config(model_dir, runner_env, logits_processors=[OTHER, PROCESSOR]) == expected


def test_speculative_decoding_on_the_v1_runner_is_a_clear_startup_error(model_dir):
    kind, message = engine_config(model_dir, "0", logits_processors=[PROCESSOR], speculative_config=NGRAM)
    assert kind == "error"
    assert "refuses custom logits processors under speculative decoding" in message
    assert "VLLM_USE_V2_MODEL_RUNNER=1" in message


def test_speculative_decoding_on_v2_keeps_the_v2_processor(model_dir):
    assert engine_config(model_dir, "1", logits_processors=[PROCESSOR], speculative_config=NGRAM) == [True, [PROCESSOR_V2]]
