"""Recurrence kernels: plain torch references that run anywhere."""
