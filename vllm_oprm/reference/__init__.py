"""Exact OPRM on transformers models (and the torch RWKV6 and RWKV7), CPU or GPU."""

from .generator import OPRMGenerator

__all__ = ["OPRMGenerator"]
