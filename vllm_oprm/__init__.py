"""OPRM (Overflow Prevention for Recurrent Models) for vLLM.

The core (``OPRMConfig``, ``OPRMPrompt``, selection) and the transformers
reference backend import without vLLM installed; ``OPRMLLM`` imports vLLM on
first use.
"""

from .core import OPRMConfig, OPRMOutput, OPRMPrompt

__version__ = "0.1.0"
__all__ = ["OPRMConfig", "OPRMLLM", "OPRMOutput", "OPRMPrompt", "__version__"]


def __getattr__(name: str):
    if name == "OPRMLLM":
        from .engine.offline import OPRMLLM

        return OPRMLLM
    raise AttributeError(f"module 'vllm_oprm' has no attribute {name!r}")
