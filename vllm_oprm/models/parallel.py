"""Parameters the model classes share: a rank's part of a checkpoint tensor, or a tensor sized by the checkpoint;
and the by-name weight loading of the classes whose parameters are named as in their checkpoints."""

from __future__ import annotations

from collections.abc import Iterable

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


def checkpoint_sized(dim: int | None = None, rank: int = 0, ranks: int = 1) -> nn.Parameter:
    """A parameter whose size the checkpoint decides (a LoRA rank no config field names): it takes the
    loaded tensor's shape, or this rank's equal part of it along ``dim``."""
    part = nn.Parameter(torch.empty(0), requires_grad=False)

    def load(target: nn.Parameter, full: torch.Tensor) -> None:
        if dim is not None:
            size = full.shape[dim] // ranks
            full = full.narrow(dim, rank * size, size)
        target.data = full.to(device=target.device, dtype=target.dtype).contiguous()

    part.weight_loader = load
    return part


def load_by_name(
    module: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    family: str,
    skip: str | None,
    stacked: dict[str, tuple[str, int | str]] | None = None,
) -> set[str]:
    """Each checkpoint tensor into ``module``'s parameter of the same name, one tensor at a time (a sharded
    parameter takes its rank's part through its ``weight_loader``); ``skip`` names a tensor to pass over (a head
    tied to the embedding). ``stacked`` maps a checkpoint name part to vLLM's merged parameter and the shard it
    fills (``q_proj`` to ``("qkv_proj", "q")``). A name the module lacks, or a parameter the checkpoint lacks,
    raises."""
    params = dict(module.named_parameters())
    loaded = set()
    for name, tensor in weights:
        if name == skip:
            continue
        shard = ()
        for part, (merged, shard_id) in (stacked or {}).items():
            if f".{part}." in name:
                name, shard = name.replace(f".{part}.", f".{merged}."), (shard_id,)
                break
        if name not in params:
            raise ValueError(f"unexpected {family} weight {name}")
        param = params[name]
        loader = getattr(param, "weight_loader", None)
        if loader is not None:
            loader(param, tensor, *shard)
        else:
            param.data.copy_(tensor)
        loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"checkpoint lacks {family} weights {missing[:3]}")
    return loaded
