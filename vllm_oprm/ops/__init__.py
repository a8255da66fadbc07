"""Recurrence kernels: plain torch references that run anywhere, and the Triton fast paths CUDA takes."""
