"""The OpenAI-compatible endpoint: ``POST /v1/chat/completions`` (stream or not) and ``GET /v1/models``.

A sub-application of its own (mounted at ``/v1`` by `create_app`, or by a host with
`server.app.setup_openai_compatible`) that shares the relay API's state: one registry, one limiter, one provider.
A request takes the same way as ``POST /api/chat`` (`server/intake.py`: origin, identity from
``Authorization: Bearer`` when API keys are configured, admission, then the body), starts a `Generation` and is
answered by a `Reader` with a framing of `server/openai_chunks.py` made for this response. Only the shape of
errors differs: OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with the same statuses, so the openai
SDKs raise their own exception types (``BadRequestError``, ``AuthenticationError``, ``RateLimitError``...).

The client's ``Authorization`` only ever identifies it to the relay: the upstream request is the provider's own,
made with the relay's upstream key, which no response carries.
"""

from __future__ import annotations

import logging
import time
from functools import partial

from aiohttp import web

from .errors import NotFound, RelayError
from .framing import Framing, OpenAIChunkFraming, OpenAICompletionFraming
from .handlers import run_reader, start_generation
from .intake import admit_then, check_origin, expect_handler, read_json_body
from .logs import access_middleware, add_request_id
from .openai_chunks import openai_error_body
from .openai_request import OpenAIRequest, parse_openai_request
from .reader import Reader
from .responses import error_response
from .state import RELAY

__all__ = ["OPENAI_PREFIX", "chat_completions", "create_openai_app", "models", "openai_error_response"]

log = logging.getLogger("llm_relay.openai")

OPENAI_PREFIX = "/v1"


def openai_error_response(error: RelayError, extra_headers: dict[str, str] | None = None) -> web.Response:
    """`error` as OpenAI answers a refused request: its status, ``Retry-After``, and OpenAI's error object."""
    return error_response(error, extra_headers, body=openai_error_body(error))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``: a ``chat.completion.chunk`` stream, or the whole ``chat.completion``."""
    state = request.app[RELAY]

    async def take(request: web.Request) -> OpenAIRequest:
        return parse_openai_request(await read_json_body(request, state), state.rules)

    admitted = await admit_then(request, state, take, lambda asked: asked.chat, respond=openai_error_response)
    if isinstance(admitted, web.StreamResponse):
        return admitted
    asked = admitted.taken
    chat = asked.chat
    generation = await start_generation(
        state, chat, admitted.admission, admitted.reservation, resumable=False, framing="openai"
    )
    created = int(time.time())
    framing: Framing = (
        OpenAIChunkFraming(chat.model, created, include_usage=asked.include_usage)
        if asked.stream
        else OpenAICompletionFraming(chat.model, created)
    )
    reader = Reader(
        request,
        generation,
        state.streams,
        framing,
        state.reader_settings,
        keepalive=asked.stream,
        headers=admitted.headers,
        respond=openai_error_response,
    )
    return await run_reader(request, reader)


def _model(name: str) -> dict[str, object]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "llm-relay"}


async def models(request: web.Request) -> web.Response:
    """``GET /v1/models`` (the models a request may name: ``--model`` and ``--allow-model``) and
    ``GET /v1/models/{model}``, to a client the relay would serve (never to one without a valid key)."""
    state = request.app[RELAY]
    try:
        check_origin(request, state.origin_policy)
        state.identify(request)
        name = request.match_info.get("model")
        if name is not None and name not in state.rules.allowed_models:
            raise NotFound(f"no model {name!r} here")
    except RelayError as error:
        return openai_error_response(error)
    if name is not None:
        return web.json_response(_model(name), headers={"Cache-Control": "no-store"})
    data = [_model(model) for model in sorted(state.rules.allowed_models)]
    return web.json_response({"object": "list", "data": data}, headers={"Cache-Control": "no-store"})


def create_openai_app(relay_api: web.Application) -> tuple[web.Application, list[web.AbstractRoute]]:
    """The OpenAI-compatible sub-application, sharing `relay_api`'s state (`server.app.create_relay_app`);
    returns it and its routes (for CORS)."""
    state = relay_api[RELAY]
    # The same access line, request id and refusal counts as the relay's own API (server/logs.py), its refusals
    # in OpenAI's error shape.
    v1 = web.Application(
        middlewares=[access_middleware(state.observer, openai_error_response)],
        client_max_size=state.config.max_body_bytes,
    )
    v1[RELAY] = state
    v1.on_response_prepare.append(add_request_id)
    expect = partial(expect_handler, respond=openai_error_response)
    routes = [
        v1.router.add_post("/chat/completions", chat_completions, expect_handler=expect),
        v1.router.add_get("/models", models, allow_head=False, expect_handler=expect),
        v1.router.add_get("/models/{model}", models, allow_head=False, expect_handler=expect),
    ]
    return v1, routes
