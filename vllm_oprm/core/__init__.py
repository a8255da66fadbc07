"""The pure OPRM core: layout, chunking, batching, selection. No vLLM import."""

from .chunking import ChunkRows, aligned_chunk_size, build_rows, check_vocabulary, pack_documents, plan_batches, split_tokens
from .config import MODES, OPRMConfig
from .options import ENV_DEFAULTS, defaults_from_env, parse_options
from .output import OPRMOutput
from .prompt import PLACEHOLDER, OPRMPrompt, TokenizedPrompt
from .selection import ChunkSelector, Selection, first_token_entropy

__all__ = [
    "ENV_DEFAULTS", "MODES", "PLACEHOLDER", "ChunkRows", "ChunkSelector", "OPRMConfig", "OPRMOutput", "OPRMPrompt", "Selection",
    "TokenizedPrompt", "aligned_chunk_size", "build_rows", "check_vocabulary", "defaults_from_env", "first_token_entropy",
    "pack_documents", "parse_options", "plan_batches", "split_tokens",
]
