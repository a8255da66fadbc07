"""Stock ``vllm serve`` with the ``oprm`` endpoint plugin allow-listed: OPRM's engine pieces added for it.

An OPRM request needs the engine to run OPRM's entropy processor and worker
extension. vLLM builds the engine from the parsed command line
(``AsyncEngineArgs.from_cli_args(args)``) before it attaches endpoint plugins,
so the endpoint plugin cannot add them. This wraps ``from_cli_args``: when
``oprm`` is named in ``VLLM_PLUGINS`` (the allow-list vLLM requires for any
endpoint plugin), it appends the processor to the namespace's
``logits_processors`` (the user's stay, in their order) and sets
``worker_extension_cls`` to OPRM's, or to a class that mixes OPRM's into the
user's. It edits the namespace itself, which is the one the endpoint plugin's
``init_state`` later receives and checks. Without the allow-list nothing
changes. Idempotent: the data-parallel API servers call it again on the same
values. vLLM 0.32.0 and 0.33.0 build the front end's engine this way.
"""

from __future__ import annotations

import functools

from . import check_target

TARGET_VLLM = ("0.32.0", "0.33.0")
PLUGIN_NAME = "oprm"


def add_oprm_engine_pieces(args, processor: str, worker_extension) -> None:
    """Put OPRM's processor and (composed) worker extension on the parsed ``args``."""
    processors = list(getattr(args, "logits_processors", None) or [])
    if processor not in processors:
        args.logits_processors = [*processors, processor]
    args.worker_extension_cls = worker_extension(getattr(args, "worker_extension_cls", None))


def apply(processor: str, worker_extension) -> None:
    """``worker_extension(user's name or None)`` is the class name to give the workers."""
    check_target(
        "serve_engine_args", TARGET_VLLM,
        "check that the API server still builds its engine from AsyncEngineArgs.from_cli_args(args) and passes the "
        "same args to the endpoint plugins' init_state",
    )
    from vllm import envs
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.from_cli_args.__func__
    if getattr(original, "oprm_adds_engine_pieces", False):
        return

    @functools.wraps(original)
    def from_cli_args(cls, args):
        if PLUGIN_NAME in (envs.VLLM_PLUGINS or []):
            add_oprm_engine_pieces(args, processor, worker_extension)
        return original(cls, args)

    from_cli_args.oprm_adds_engine_pieces = True
    EngineArgs.from_cli_args = classmethod(from_cli_args)
