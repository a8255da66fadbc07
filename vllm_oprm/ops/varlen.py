"""Rows of packed tokens, the varlen layout every recurrent layer of a step shares.

vLLM hands a layer one flat batch of tokens ``[N, ...]`` and the row boundaries
(``query_start_loc``). ``RowLayout`` holds every index a layer needs to run all
rows at once, computed on the host from those boundaries before forward (so a
layer never reads a device tensor back): ``cu_seqlens`` for fla's varlen
kernels, and for the torch paths the gather that right-pads rows into
``[rows, max_len, ...]`` and the one that takes them back. Pure torch, no vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowLayout:
    cu_seqlens: torch.Tensor  # int32 [rows + 1]: row i is tokens cu_seqlens[i]:cu_seqlens[i + 1]
    cu_seqlens_cpu: torch.Tensor  # the same on the host (fla plans its varlen chunks from it without a sync)
    lengths: torch.Tensor  # int64 [rows]
    last: torch.Tensor  # int64 [rows]: each row's last token
    padded: torch.Tensor  # int64 [rows, max_len]: token t of row i, or num_tokens past the row's end
    unpadded: torch.Tensor  # int64 [num_tokens]: each token's place in the flattened [rows * max_len]
    previous: torch.Tensor  # int64 [num_tokens]: the token before, or num_tokens + row at a row's start
    max_len: int
    num_tokens: int

    @property
    def rows(self) -> int:
        return self.lengths.shape[0]

    @classmethod
    def build(cls, cu_seqlens: torch.Tensor, device: torch.device | str) -> "RowLayout":
        """From host row boundaries (a CPU tensor, ``[rows + 1]``, every row non-empty); copies to ``device``
        without waiting."""
        bounds = cu_seqlens.to("cpu", torch.int64)
        starts, lengths = bounds[:-1], bounds[1:] - bounds[:-1]
        if bool((lengths <= 0).any()):
            raise ValueError(f"every row needs a token; row lengths {lengths.tolist()}")
        rows, num_tokens, max_len = lengths.shape[0], int(bounds[-1]), int(lengths.max())
        offsets = torch.arange(max_len)
        row_of_token = torch.repeat_interleave(torch.arange(rows), lengths)
        position = torch.arange(num_tokens) - starts[row_of_token]
        padded = torch.where(offsets < lengths[:, None], starts[:, None] + offsets, num_tokens)
        previous = torch.where(position == 0, num_tokens + row_of_token, torch.arange(num_tokens) - 1)

        pin = torch.device(device).type == "cuda"

        def put(t: torch.Tensor) -> torch.Tensor:
            return (t.pin_memory() if pin else t).to(device, non_blocking=True)

        return cls(
            cu_seqlens=put(bounds.to(torch.int32)),
            cu_seqlens_cpu=bounds.to(torch.int32),
            lengths=put(lengths),
            last=put(bounds[1:] - 1),
            padded=put(padded),
            unpadded=put(row_of_token * max_len + position),
            previous=put(previous),
            max_len=max_len,
            num_tokens=num_tokens,
        )

    def pad(self, x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """``[N, ...]`` -> ``[rows, max_len, ...]``, ``fill`` past each row's end."""
        filler = torch.full((1, *x.shape[1:]), fill, dtype=x.dtype, device=x.device)
        return torch.cat([x, filler])[self.padded]

    def unpad(self, y: torch.Tensor) -> torch.Tensor:
        """``[rows, max_len, ...]`` -> ``[N, ...]``."""
        return y.flatten(0, 1)[self.unpadded]

    def shift(self, x: torch.Tensor, carried: torch.Tensor) -> torch.Tensor:
        """Token shift: each token's predecessor ``[N, C]``, the row's carried token ``carried[row]`` at its start."""
        return torch.cat([x, carried.to(x.dtype)])[self.previous]
