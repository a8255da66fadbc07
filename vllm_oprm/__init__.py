"""OPRM (Overflow Prevention for Recurrent Models) for vLLM.

The core (``OPRMConfig``, ``OPRMPrompt``, selection) and the transformers
reference backend import without vLLM installed.
"""

from .core import OPRMConfig, OPRMOutput, OPRMPrompt

__version__ = "0.1.0"
__all__ = ["OPRMConfig", "OPRMOutput", "OPRMPrompt", "__version__"]
