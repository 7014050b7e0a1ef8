"""HTTP handlers: parse, validate, negotiate, admit, then hand the request to a `RelayStream`.

Everything that can be refused is refused here, before a byte of the response is written, so that every refusal
is a proper status with a JSON body ``{"error": {"type", "message"}}``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web

from . import chat_request
from .errors import (
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RelayError,
    UnsupportedMediaType,
)
from .framing import FRAMINGS
from .negotiation import choose_framing
from .request_origin import OriginPolicy, SourceHeaders
from .state import RELAY
from .stream import RelayStream, error_response

log = logging.getLogger("llm_relay.handlers")

_JSON_TYPES = frozenset({"application/json", "text/json"})


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, refused with 413 past `limit` bytes (also when the app is mounted in a host whose
    ``client_max_size`` differs: aiohttp applies that only on the root app)."""
    length = request.content_length
    if length is not None and length > limit:
        raise PayloadTooLarge(f"the body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def check_origin(request: web.Request, policy: OriginPolicy) -> None:
    """Refuse a request that must not start a generation (request_origin.py): sent to a host name the relay does
    not answer for (DNS rebinding), or made by a browser for a page of another site, or as a page or resource load.

    CORS only hides a cross-origin response from the page; the request itself (and the generation it pays for)
    would still run, so the refusal must happen here, before anything starts.
    """
    policy.check_api_request(SourceHeaders.from_headers(request.headers), request.scheme)


def check_host(request: web.Request, policy: OriginPolicy) -> None:
    """Refuse a request sent to a host name the relay does not answer for (421); for the page."""
    policy.check_host(request.headers.get(hdrs.HOST))


async def chat(request: web.Request) -> web.StreamResponse:
    """``GET /chat?prompt=...`` (EventSource) and ``POST /chat`` with a JSON body (fetch)."""
    state = request.app[RELAY]
    if request.method == hdrs.METH_GET and hdrs.LAST_EVENT_ID in request.headers:
        # Only a reconnecting EventSource sends Last-Event-ID. Starting the generation again would pay for a
        # second reply; 204 is the spec's "stop reconnecting" (WHATWG HTML §9.2.3), so the browser gives up.
        return web.Response(status=204, headers={"Cache-Control": "no-store"})
    try:
        check_origin(request, state.origin_policy)
        framing = FRAMINGS[choose_framing(request.headers.get(hdrs.ACCEPT), request.query.get("format"))]
        if request.method == hdrs.METH_GET:
            chat_req = chat_request.from_query(request.query, state.rules)
        else:
            mime = request.content_type
            if mime not in _JSON_TYPES:
                raise UnsupportedMediaType("send the body as application/json")
            body = await read_body(request, state.config.max_body_bytes)
            chat_req = chat_request.from_json_body(body, state.rules)
        client = state.identify(request)
        admission = await state.limiter.admit(client)
    except RelayError as error:
        return error_response(error)
    stream = RelayStream(
        state.provider,
        chat_req,
        framing,
        state.stream_settings,
        headers=dict(admission.headers),
        keepalive=framing.name == "sse" or state.config.ndjson_keepalive,
    )
    state.streams.add(stream)
    try:
        return await stream.run(request)
    finally:
        state.streams.discard(stream)
        await admission.release()
        log.debug("stream %s ended: %s after %d events", stream.id, stream.outcome, stream.seq)


async def healthz(request: web.Request) -> web.Response:
    state = request.app[RELAY]
    return web.json_response(
        {"status": "ok", "provider": state.provider.name, "open_streams": len(state.streams)},
        headers={"Cache-Control": "no-store"},
    )


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """aiohttp's own 404 and 405 become JSON errors like every other refusal of the API."""
    try:
        return await handler(request)
    except web.HTTPMethodNotAllowed as exc:
        allow = exc.headers.get(hdrs.ALLOW, "")
        return error_response(
            MethodNotAllowed(f"use one of: {allow}" if allow else "method not allowed"), {hdrs.ALLOW: allow}
        )
    except web.HTTPNotFound:
        return error_response(NotFound("no such endpoint"))
    except RelayError as error:
        return error_response(error)


__all__ = ["chat", "check_host", "check_origin", "healthz", "json_errors", "read_body"]
