"""What an OPRM generation returns, whatever the backend."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class OPRMOutput:
    """The answer and how it was chosen.

    In ``summarize`` mode ``text`` joins every chunk's answer in chunk order,
    ``token_ids`` concatenates their tokens, ``chunk_texts`` keeps them apart and
    ``selected_chunk`` is None. After an early exit (``stopped_early``) the
    chunks never read have entropy None.
    """

    text: str
    token_ids: list[int]
    num_chunks: int
    selected_chunk: int | None
    entropies: list[float | None]
    chunk_texts: list[str] = field(default_factory=list)
    stopped_early: bool = False
