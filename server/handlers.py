"""HTTP handlers: identify, admit, validate and negotiate (`server/intake.py`), then hand the request to a
`RelayStream`.

Everything that can be refused is refused here, before a byte of the response is written, so that every refusal
is a proper status with a JSON body ``{"error": {"type", "message"}}``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web

from .errors import MethodNotAllowed, NotFound, RelayError
from .intake import accept_chat, check_origin, read_body
from .state import RELAY
from .stream import RelayStream, error_response

log = logging.getLogger("llm_relay.handlers")


async def chat(request: web.Request) -> web.StreamResponse:
    """``GET /chat?prompt=...`` (EventSource) and ``POST /chat`` with a JSON body (fetch)."""
    state = request.app[RELAY]
    if request.method == hdrs.METH_GET and hdrs.LAST_EVENT_ID in request.headers:
        # Only a reconnecting EventSource sends Last-Event-ID. Starting the generation again would pay for a
        # second reply; 204 is the spec's "stop reconnecting" (WHATWG HTML §9.2.3), so the browser gives up.
        return web.Response(status=204, headers={"Cache-Control": "no-store"})
    accepted = await accept_chat(request, state)  # identified and admitted before the body is read (intake.py)
    if isinstance(accepted, web.StreamResponse):
        return accepted
    chat_req, framing, admission = accepted.chat, accepted.framing, accepted.admission
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


__all__ = ["chat", "check_origin", "healthz", "json_errors", "read_body"]
