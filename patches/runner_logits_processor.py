"""Hand OPRM's first-token processor to the model runner vLLM picks: V1 or Model Runner V2.

vLLM 0.32 and 0.33 each load ``logits_processors`` of one interface only, the
V1 runner's (``vllm.v1.sample.logits_processor``) or Model Runner V2's
(``vllm.v1.worker.gpu.sample.logits_processor``), and refuse the other's.
Which runner runs is ``VllmConfig.use_v2_model_runner``: the platform, Triton,
``VLLM_USE_V2_MODEL_RUNNER``, and features that force one runner (watermarking
and HiSparse force V2, some speculative methods V1). OPRM names its V1 class in
the engine arguments; right after ``EngineArgs.create_engine_config`` builds
the config, in the front-end process, this swaps it for the V2 class when V2
will run, so the choice stays vLLM's and no runner is pinned. The V1 runner
refuses every custom logits processor under speculative decoding (at worker
start-up, "Custom logits processors are not supported when speculative decoding
is enabled"), so that combination fails here, naming the conflict; V2 takes
custom processors with speculative decoding.
"""

from __future__ import annotations

import functools

from . import check_target

TARGET_VLLM = ("0.32.0", "0.33.0")


def choose_processor(vllm_config, v1_processor: str, v2_processor: str) -> None:
    """Swap ``v1_processor`` for ``v2_processor`` in ``vllm_config`` when Model Runner V2 runs."""
    processors = list(vllm_config.model_config.logits_processors or [])
    if v1_processor not in processors:
        return
    if vllm_config.use_v2_model_runner:
        vllm_config.model_config.logits_processors = [v2_processor if p == v1_processor else p for p in processors]
    elif vllm_config.speculative_config is not None:
        raise ValueError(
            "OPRM reads first-token entropies with a logits processor, and vLLM's V1 model runner (the one this "
            "engine would run) refuses custom logits processors under speculative decoding: drop "
            "--speculative-config, or run Model Runner V2 (the default on CUDA; VLLM_USE_V2_MODEL_RUNNER=1)"
        )


def apply(v1_processor: str, v2_processor: str) -> None:
    check_target(
        "runner_logits_processor", TARGET_VLLM,
        "check VllmConfig.use_v2_model_runner and both runners' logits-processor loaders before re-targeting",
    )
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, "oprm_chooses_processor", False):
        return

    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        vllm_config = original(self, *args, **kwargs)
        choose_processor(vllm_config, v1_processor, v2_processor)
        return vllm_config

    create_engine_config.oprm_chooses_processor = True
    EngineArgs.create_engine_config = create_engine_config
