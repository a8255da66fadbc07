"""vLLM endpoint plugin: OPRM on ``/v1/completions`` and ``/v1/chat/completions``.

A request carrying an ``oprm`` object (``extra_body={"oprm": {...}}`` in the
``openai`` client) has its prompt, or its rendered chat prompt, split at the one
``{{context}}`` placeholder into prefix and suffix; the context is chunked and
the layout validated here, so every problem is an HTTP 400 before the engine
sees anything. The request then runs through vLLM's own route and serving code
(streaming, usage, stop strings, disconnect handling) with ``current_job`` set,
so the wrapped engine client fans it out (``engine/online.py``). The response,
and every streamed event once the choice is made, gains an ``oprm`` object.
Requests without ``oprm`` go to vLLM's handlers untouched.

vLLM loads endpoint plugins only when named in ``VLLM_PLUGINS``; ``vllm-oprm
serve`` does that and adds the entropy processor and worker extension.
"""

from __future__ import annotations

import asyncio
import json
import threading
from argparse import Namespace
from collections import OrderedDict
from types import SimpleNamespace
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from vllm.entrypoints.openai.chat_completion import api_router as vllm_chat
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion import api_router as vllm_completion
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.entrypoints.serve.utils.api_utils import validate_json_request

from ..core import OPRMPrompt, Selection, defaults_from_env, parse_options
from ..core.options import MAX_CHUNKS
from ..engine.capture import PROCESSOR, WORKER_EXTENSION, is_oprm_worker_extension
from ..engine.layout import plan_request, prefix_cache_block
from ..engine.online import OPRMEngineClient, OPRMJob, RowAdmission, current_job

router = APIRouter()
SERVINGS = ("openai_serving_completion", "openai_serving_chat")


@router.post("/v1/completions", dependencies=[Depends(validate_json_request)])
async def create_completion(request: CompletionRequest, raw_request: Request):
    return await _serve(request, raw_request, "openai_serving_completion", vllm_completion.create_completion)


@router.post("/v1/chat/completions", dependencies=[Depends(validate_json_request)])
async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request):
    return await _serve(request, raw_request, "openai_serving_chat", vllm_chat.create_chat_completion)


async def _serve(request, raw_request: Request, serving_name: str, vllm_route):
    options = (request.model_extra or {}).get("oprm")
    if options is None:
        return await vllm_route(request, raw_request)
    state = raw_request.app.state
    serving = getattr(state, serving_name)
    try:
        template = await _template(request, serving)
        job = await asyncio.to_thread(_plan, request, template, options, state)
    except ValueError as error:
        return _error(serving.create_error_response(str(error)))
    except _Rejected as rejected:
        return _error(rejected.response)
    token = current_job.set(job)
    try:
        response = await vllm_route(request, raw_request)
    finally:
        current_job.reset(token)
    return _with_selection(response, job)


class _Rejected(Exception):
    def __init__(self, response: ErrorResponse):
        self.response = response


async def _template(request, serving) -> str:
    """The prompt text holding ``{{context}}``: the completion prompt, or the rendered chat."""
    if isinstance(request, CompletionRequest):
        if not isinstance(request.prompt, str):
            raise ValueError("with oprm, prompt must be one string containing {{context}}")
        return request.prompt
    rendered = await serving.render_chat_request(request)
    if isinstance(rendered, ErrorResponse):
        raise _Rejected(rendered)
    _, engine_inputs = rendered
    text = engine_inputs[0].get("prompt") if len(engine_inputs) == 1 else None
    if not isinstance(text, str):
        raise ValueError("with oprm, the chat must render to one text prompt containing {{context}}")
    return text


def _plan(request, template: str, options: Any, state) -> OPRMJob:
    """Validate the request and lay out its chunk rows (in a thread: tokenizing a long context)."""
    unsupported = {
        "echo": request.echo,
        "prompt_logprobs": request.prompt_logprobs is not None,
        "use_beam_search": request.use_beam_search,
    }
    for name, used in unsupported.items():
        if used:
            raise ValueError(f"{name} is not supported with oprm")
    oprm = state.oprm
    context, config = parse_options(options, oprm.defaults, oprm.tokenizer)
    max_tokens = getattr(request, "max_completion_tokens", None) or request.max_tokens
    limits = SimpleNamespace(
        n=request.n or 1, best_of=getattr(request, "best_of", None), max_tokens=max_tokens, extra_args=request.vllm_xargs
    )
    prompt = OPRMPrompt.from_template(template, context)
    layout = plan_request(
        prompt, limits, config, oprm.tokenizer, oprm.max_model_len, request.add_special_tokens, oprm.cache_block_size
    )
    if layout.num_chunks > oprm.max_chunks:
        raise ValueError(
            f"the context makes {layout.num_chunks} chunks of {config.chunk_size} tokens, over this server's limit "
            f"of {oprm.max_chunks} (--oprm-max-chunks); send a larger chunk_size or a shorter context"
        )
    return OPRMJob(layout, config, oprm.max_model_len)


def _error(response: ErrorResponse) -> JSONResponse:
    return JSONResponse(content=response.model_dump(), status_code=response.error.code)


def selection_json(selection: Selection) -> dict[str, Any]:
    return {
        "num_chunks": selection.num_chunks,
        "selected_chunk": selection.selected_chunk,
        "entropies": list(selection.entropies),
        "chunks_read": selection.chunks_read,
        "stopped_early": selection.stopped_early,
        "prefill_tokens": {
            "total": selection.prefill_tokens,
            "cached": selection.cached_tokens,
            "computed": selection.computed_tokens,
        },
    }


class ClosingStreamingResponse(StreamingResponse):
    """A streaming response that closes its body however the stream ends.

    Starlette leaves the body iterator suspended when the client goes away
    while a chunk is being sent; without an explicit close, the OPRM request's
    chunk requests would be aborted only when the garbage collector gets to it.
    """

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def _with_selection(response, job: OPRMJob):
    """Add ``oprm`` to a JSON response, or to each streamed event once it is known."""
    if isinstance(response, StreamingResponse):
        return ClosingStreamingResponse(
            _stream_with_selection(response.body_iterator, job),
            status_code=response.status_code,
            headers=dict(response.headers),
            background=response.background,
        )
    if isinstance(response, JSONResponse) and response.status_code == 200 and job.selection is not None:
        body = json.loads(response.body)
        body["oprm"] = selection_json(job.selection)
        headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
        return JSONResponse(body, headers=headers)
    return response


async def _stream_with_selection(events, job: OPRMJob):
    try:
        async for chunk in events:
            if job.selection is not None:
                text = chunk if isinstance(chunk, str) else chunk.decode()
                chunk = "\n\n".join(_event_with_selection(event, job.selection) for event in text.split("\n\n"))
            yield chunk
    finally:  # the fan-out first: its cleanup aborts the chunk requests still in the engine
        if job.outputs is not None:
            await job.outputs.aclose()
        await events.aclose()


def _event_with_selection(event: str, selection: Selection) -> str:
    if not event.startswith("data: {"):
        return event  # [DONE], keep-alive comments, separators
    payload = json.loads(event[len("data: ") :])
    payload["oprm"] = selection_json(selection)
    return "data: " + json.dumps(payload)


class RecentDocuments:
    """A tokenizer that remembers the token ids of the last few long texts it encoded.

    Users ask many questions about one long document; with vLLM's prefix cache
    holding its chunk states, re-tokenizing it (0.2 s for 128k tokens here) is
    most of what a repeated question costs. Short texts are encoded as usual.
    """

    def __init__(self, tokenizer: Any, entries: int = 16, min_chars: int = 10_000):
        self._tokenizer, self._entries, self._min_chars = tokenizer, entries, min_chars
        self._recent: OrderedDict[tuple[str, bool], list[int]] = OrderedDict()
        self._lock = threading.Lock()  # plans run in worker threads

    def __len__(self) -> int:
        return len(self._tokenizer)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) < self._min_chars:
            return self._tokenizer.encode(text, add_special_tokens=add_special_tokens)
        key = (text, add_special_tokens)
        with self._lock:
            if key in self._recent:
                self._recent.move_to_end(key)
                return self._recent[key]
        ids = self._tokenizer.encode(text, add_special_tokens=add_special_tokens)
        with self._lock:
            self._recent[key] = ids
            while len(self._recent) > self._entries:
                self._recent.popitem(last=False)
        return ids


class OPRMServerState:
    """Per-app settings: server-wide option defaults and limits (chunks per request, chunk rows in
    prefill across requests), the tokenizer, the engine's cache block."""

    def __init__(self, defaults: dict[str, Any], tokenizer: Any, max_model_len: int, cache_block_size: int | None):
        self.defaults = defaults
        self.max_chunks = defaults.pop("max_chunks", MAX_CHUNKS)
        if self.max_chunks <= 0:
            raise ValueError(f"OPRM_MAX_CHUNKS must be positive, got {self.max_chunks}")
        limit = defaults.pop("max_inflight_rows", None)
        self.admission = None if limit is None else RowAdmission(limit)
        self.tokenizer = RecentDocuments(tokenizer)
        self.max_model_len = max_model_len
        self.cache_block_size = cache_block_size


class OPRMEndpoints:
    """The ``vllm.endpoint_plugins`` entry (name ``oprm``): replaces the two routes."""

    name = "oprm"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(router)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        if engine_client is None:
            return  # the render-only server has no engine to fan out on
        # The general plugin adds both to the engine arguments of an allow-listed server
        # (patches/serve_engine_args.py); an engine built some other way may lack them.
        missing = []
        if PROCESSOR not in (args.logits_processors or []):
            missing.append(f"--logits-processors {PROCESSOR}")
        if not is_oprm_worker_extension(args.worker_extension_cls):
            missing.append(f"--worker-extension-cls {WORKER_EXTENSION}")
        if missing:
            raise RuntimeError(f"vllm-oprm's server plugin needs {' and '.join(missing)} (`vllm-oprm serve` adds them)")
        servings = [getattr(state, name) for name in SERVINGS if getattr(state, name, None) is not None]
        tokenizer = servings[0].renderer.tokenizer
        state.oprm = OPRMServerState(
            defaults_from_env(),
            tokenizer,
            engine_client.model_config.max_model_len,
            prefix_cache_block(engine_client.vllm_config),
        )
        priority_scheduling = engine_client.vllm_config.scheduler_config.policy == "priority"
        for serving in servings:  # one admission for both routes
            serving.engine_client = OPRMEngineClient(serving.engine_client, state.oprm.admission, priority_scheduling)
        # A bad server default fails at start, not on every request.
        _, config = parse_options({"context": "-"}, state.oprm.defaults, tokenizer)
        if config.prefix_cache and state.oprm.cache_block_size is None:
            raise RuntimeError(
                "--oprm-prefix-cache needs --enable-prefix-caching on a model whose recurrent state vLLM caches"
            )
