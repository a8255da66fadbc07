"""Tensor-parallel helpers the model classes share."""

from __future__ import annotations

import torch
from torch import nn


def rank_part(shape: tuple[int, ...], dim: int, rank: int, full_shape: tuple[int, ...]) -> nn.Parameter:
    """A parameter of this rank's ``shape`` that loads its slice, along ``dim``, of the full tensor
    (stored in any shape of ``full_shape``'s size, as Finch checkpoints store ``time_decay``)."""
    part = nn.Parameter(torch.empty(shape), requires_grad=False)
    size = shape[dim]

    def load(target: nn.Parameter, full: torch.Tensor) -> None:
        target.copy_(full.reshape(full_shape).narrow(dim, rank * size, size))

    part.weight_loader = load
    return part
