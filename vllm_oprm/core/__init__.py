"""The pure OPRM core: layout, chunking, batching, selection. No vLLM import."""

from .chunking import ChunkRows, build_rows, check_vocabulary, pack_documents, plan_batches, split_tokens
from .config import MODES, OPRMConfig
from .output import OPRMOutput
from .prompt import OPRMPrompt, TokenizedPrompt
from .selection import ChunkSelector, Selection, first_token_entropy

__all__ = [
    "MODES", "ChunkRows", "ChunkSelector", "OPRMConfig", "OPRMOutput", "OPRMPrompt", "Selection",
    "TokenizedPrompt", "build_rows", "check_vocabulary", "first_token_entropy", "pack_documents", "plan_batches", "split_tokens",
]
