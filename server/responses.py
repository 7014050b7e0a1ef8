"""The one place a `RelayError` becomes an HTTP response: a status, ``Retry-After`` and a JSON body."""

from __future__ import annotations

import math
from collections.abc import Callable

from aiohttp import hdrs, web

from .errors import Forbidden, MethodNotAllowed, NotFound, RelayError
from .framing import json_bytes

# The error type of an error response, kept on it for the access log and the refusal metrics (server/logs.py).
ERROR_TYPE = web.ResponseKey("llm_relay_error_type", str)

# How an endpoint answers a refusal: `error_response`, or another error dialect (OpenAI's, under ``/v1``).
Respond = Callable[[RelayError, dict[str, str] | None], web.Response]

# A Retry-After past this is clamped: a client told to wait for years (an upstream's "1e400") would never retry.
MAX_RETRY_AFTER = 3600
# Every 429 and 503 says when to try again (RFC 9110 §10.2.3; the README promises it). One whose cause gives no
# better time (an upstream that rate limits without a Retry-After, a server shutting down) says a second.
DEFAULT_RETRY_AFTER = 1.0


def retry_after_field(seconds: float) -> str:
    """RFC 9110 §10.2.3 delay-seconds: a whole number, rounded up so a client never retries too early; clamped to
    `MAX_RETRY_AFTER` and to 0 for anything not a finite non-negative number.

    >>> retry_after_field(1.2), retry_after_field(float("inf")), retry_after_field(-3)
    ('2', '3600', '0')
    """
    if math.isnan(seconds) or seconds <= 0:
        return "0"
    return str(min(MAX_RETRY_AFTER, math.ceil(seconds)) if math.isfinite(seconds) else MAX_RETRY_AFTER)


def error_response(
    error: RelayError, extra_headers: dict[str, str] | None = None, *, body: object | None = None
) -> web.Response:
    """The JSON error response for `error` ({"error": {"type", "message"}}, or `body` for an endpoint that speaks
    another error dialect: the OpenAI-compatible one), with its status and headers."""
    headers = dict(error.headers)
    if extra_headers:
        headers.update(extra_headers)
    retry_after = error.retry_after
    if retry_after is None and error.status in (429, 503):
        retry_after = DEFAULT_RETRY_AFTER
    if retry_after is not None:
        headers["Retry-After"] = retry_after_field(retry_after)
    response = web.Response(
        status=error.status,
        body=json_bytes(error.body() if body is None else body),
        content_type="application/json",
        headers=headers,
    )
    response[ERROR_TYPE] = error.type
    return response


def refusal_for(exc: BaseException, respond: Respond) -> web.Response | None:
    """aiohttp's own 404 and 405, aiohttp-cors's 403 for a preflight it refuses, or a `RelayError` a handler
    raised, answered with `respond` like every other refusal of its application; None for any other exception."""
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allow = exc.headers.get(hdrs.ALLOW, "")
        return respond(MethodNotAllowed(f"use one of: {allow}" if allow else "method not allowed"), {hdrs.ALLOW: allow})
    if isinstance(exc, web.HTTPNotFound):
        return respond(NotFound("no such endpoint"), None)
    if isinstance(exc, web.HTTPForbidden):  # aiohttp-cors refusing a preflight
        return respond(Forbidden("the server's CORS settings do not allow this origin, method or header"), None)
    if isinstance(exc, RelayError):
        return respond(exc, None)
    return None
