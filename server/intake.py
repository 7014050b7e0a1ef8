"""Taking a chat request in: who is asking, whether they may, and only then what they ask.

    origin ─▶ identify (401, 429 after failed keys) ─▶ admit (429, 503) ─▶ negotiate, validate, read the body
              (nothing of the body is read, parsed or         (a token and a slot are taken; any refusal from
               invited for a client refused here)               here gives the slot back, the token stays spent)

A request is identified and admitted from its head alone, so a client that is refused never has its body read
or parsed, and never sees more than why it was refused (not, say, the list of allowed models). An admitted
request that turns out invalid has cost its client a rate token, as a valid one does: reading and checking a
body of up to ``--max-body-bytes`` is work, and a client should not get it for free by asking badly. With a token
budget (`server/budget.py`), a valid request then reserves its estimate (429 when it does not fit), which needs
the body: the prompt and ``max_tokens``.

* ``Expect: 100-continue`` (RFC 9110 §10.1.1): aiohttp's default expect handler answers 100 Continue as soon as
  the route matches, inviting the body before anyone knows who sent it. `expect_handler` defers that answer, and
  `read_chat_request` sends it once the request is admitted, just before it reads the body.
* A refusal before the whole body was read carries ``Connection: close`` (RFC 9110 §10.1.1 asks the server to
  say whether it will go on reading; RFC 9112 §9.6): the client stops sending, and the body is never read as the
  next request. What aiohttp still reads of it after the response is its lingering close, bounded by the
  runner's ``lingering_time`` (`server.app.runner_settings`).
* The body must arrive within ``--request-body-timeout`` (408), be at most ``--max-body-bytes`` (413), and a
  client that goes away while sending it is a debug line, not a traceback.

Every refusal is a `RelayError` turned into a response by `server.responses.error_response`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from aiohttp import HttpVersion11, hdrs, http_exceptions, web

from . import chat_request
from .admission import Admission
from .budget import merge_fields
from .budget_backends import BudgetReservation
from .chat_request import ChatRequest
from .errors import (
    ExpectationFailed,
    IncompleteBody,
    PayloadTooLarge,
    RelayError,
    RequestError,
    RequestTimeout,
    UnsupportedMediaType,
)
from .framing import FRAMINGS, Framing
from .negotiation import choose_framing, field_value
from .request_origin import OriginPolicy, SourceHeaders
from .responses import error_response

if TYPE_CHECKING:
    from .state import RelayState

log = logging.getLogger("llm_relay.intake")

_JSON_TYPES = frozenset({"application/json", "text/json"})


async def _not_routed(request: web.Request) -> web.StreamResponse:  # the route is never served
    raise web.HTTPNotFound()


# aiohttp's own answer to ``Expect: 100-continue`` (its default expect handler: the interim response written, and
# kept out of the response's size, so an error after it is still answered), reached through the public route API:
# a route made without an expect handler of its own has it. The relay only chooses when (after admission); aiohttp
# has no other public call for an interim response, and a `StreamResponse` can only be the final one.
_AIOHTTP_CONTINUE = web.PlainResource("/").add_route(hdrs.METH_POST, _not_routed)

T = TypeVar("T")
# How an endpoint turns a refusal into its response: the relay's error body, or another dialect (OpenAI's).
Respond = Callable[[RelayError, dict[str, str] | None], web.Response]


@dataclass(frozen=True, slots=True)
class Admitted(Generic[T]):
    """What `admit_then` took of an admitted request, who the client is, and its admission (the caller owns it from
    here and must release it, usually by handing it to a generation)."""

    taken: T
    admission: Admission
    client: str
    # The token budget's reservation (None without one): the generation settles it at its end.
    reservation: BudgetReservation | None = None

    @property
    def headers(self) -> dict[str, str]:
        """The admitted response's RateLimit fields: the request policies, then the token policies."""
        if self.reservation is None:
            return dict(self.admission.headers)
        return merge_fields(self.admission.headers, self.reservation.headers)


def negotiated_framing(request: web.Request) -> Framing:
    """The framing the request asks for: its ``Accept`` (all its field lines), or the ``format`` override; 406 or
    400 when there is none it can have (`server.negotiation.choose_framing`)."""
    accept = field_value(request.headers.getall(hdrs.ACCEPT, ()))
    return FRAMINGS[choose_framing(accept, request.query.get("format"))]


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


# The request content codings aiohttp's parser decodes before the body reaches a handler, as the whole field value
# (a list of codings it passes on undecoded). "br" and "zstd" only with optional packages, without which the parser
# itself refuses the request before any handler runs: never offered here.
_BODY_CODINGS = frozenset({"identity", "gzip", "deflate"})


def check_content_coding(request: web.Request) -> None:
    """415 before the body is read when its ``Content-Encoding`` is one the body cannot be read in (RFC 9110
    §8.4.1: an origin server MAY refuse a content coding it does not accept with 415); without this, a coding
    aiohttp passes on undecoded would be parsed as if it were none."""
    coding = request.headers.get(hdrs.CONTENT_ENCODING)
    if coding is not None and coding.strip().lower() not in _BODY_CODINGS:
        raise UnsupportedMediaType("send the body uncompressed, or with Content-Encoding: gzip or deflate")


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, refused with 413 past `limit` bytes (also when the app is mounted in a host whose
    ``client_max_size`` differs: aiohttp applies that only on the root app), and with 400 when the client goes
    away or breaks the body's framing before its end."""
    length = request.content_length
    if length is not None and length > limit:
        raise PayloadTooLarge(f"the body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"the body is larger than {limit} bytes")
            chunks.append(chunk)
    except (ConnectionError, web.RequestPayloadError) as exc:
        if isinstance(exc.__cause__, http_exceptions.ContentEncodingError):
            # aiohttp's parser failed to decode the body in its Content-Encoding (it says which).
            raise RequestError("the body is not valid in its Content-Encoding") from None
        # A reset or a broken chunked encoding: the client's doing, and nobody is left to read a traceback.
        log.debug("request body cut short after %d bytes: %s", size, exc)
        raise IncompleteBody("the connection ended before the body was complete") from None
    return b"".join(chunks)


async def expect_handler(request: web.Request, respond: Respond = error_response) -> web.StreamResponse | None:
    """The chat route's ``Expect`` handler: meets 100-continue later (`send_continue`), refuses anything else
    (`respond` shapes the refusal: ``functools.partial`` it for another error dialect).

    RFC 9110 §10.1.1: an HTTP/1.0 request's expectation is ignored; an expectation other than 100-continue gets
    417. aiohttp calls this before the handler, and answers 100 Continue itself if the route has no handler of
    its own.
    """
    if request.version != HttpVersion11:
        return None
    if request.headers.get(hdrs.EXPECT, "").strip().lower() == "100-continue":
        return None
    return refusal(request, ExpectationFailed("the only expectation this server meets is 100-continue"), None, respond)


async def send_continue(request: web.Request) -> None:
    """Invite the body of a request that asked to be invited (``Expect: 100-continue``), once it is admitted."""
    if request.version != HttpVersion11 or request.headers.get(hdrs.EXPECT, "").strip().lower() != "100-continue":
        return
    if request.content.is_eof():  # nothing left to invite (RFC 9110 §10.1.1: the server MAY then omit it)
        return
    # What aiohttp would have done before the handler, done after admission (tests/test_intake.py pins that only an
    # admitted client gets 100 Continue, and then its reply).
    await _AIOHTTP_CONTINUE.handle_expect_header(request)


def refusal(
    request: web.Request,
    error: RelayError,
    headers: dict[str, str] | None = None,
    respond: Respond = error_response,
) -> web.Response:
    """The response for a refused request (made by `respond`: an endpoint may speak another error dialect); it
    closes the connection if the body was not read to its end."""
    response = respond(error, headers)
    if request.body_exists and not request.content.is_eof():
        response.force_close()
    return response


async def read_chat_request(request: web.Request, state: RelayState) -> ChatRequest:
    """The `ChatRequest` in the query string (GET) or the JSON body (POST), read within the body timeout."""
    if request.method == hdrs.METH_GET:
        chat_request.check_query_encoding(request.rel_url.raw_query_string)
        return chat_request.from_query(request.query, state.rules)
    return chat_request.from_json_body(await read_json_body(request, state), state.rules)


async def read_json_body(request: web.Request, state: RelayState) -> bytes:
    """A JSON request's body (415 for another media type), invited (100-continue) and read within the body timeout
    (408) and size (413)."""
    if request.content_type not in _JSON_TYPES:
        raise UnsupportedMediaType("send the body as application/json")
    check_content_coding(request)
    limit = state.config.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"the body is larger than {limit} bytes")  # before inviting it
    timeout = state.config.request_body_timeout or None
    try:
        async with asyncio.timeout(timeout) as clock:
            await send_continue(request)
            body = await read_body(request, limit)
    except TimeoutError:
        if not clock.expired():
            raise
        raise RequestTimeout(f"the body did not arrive within {timeout:g} s") from None
    return body


async def accept_chat(request: web.Request, state: RelayState) -> Admitted[tuple[Framing, ChatRequest]] | web.Response:
    """Identify, admit, then negotiate and validate a chat request (its framing and its chat); a refusal is
    returned as the response to send."""

    async def take(request: web.Request) -> tuple[Framing, ChatRequest]:
        return negotiated_framing(request), await read_chat_request(request, state)

    return await admit_then(request, state, take, lambda taken: taken[1])


async def admit_then(
    request: web.Request,
    state: RelayState,
    take: Callable[[web.Request], Awaitable[T]],
    chat_of: Callable[[T], ChatRequest],
    *,
    respond: Respond = error_response,
) -> Admitted[T] | web.Response:
    """Check the origin, identify and admit the request from its head, then `take` the rest of it (negotiate, read
    and validate the body), and reserve the token budget of its chat (`chat_of` what was taken). Every endpoint that
    starts a generation comes in here; `respond` shapes its refusals. Returns what `take` returned with the client,
    its admission and its reservation, or the refusal to send."""
    try:
        check_origin(request, state.origin_policy)
        client = state.identify(request)
        admission = await state.limiter.admit(client)
    except RelayError as error:
        return refusal(request, error, respond=respond)
    try:
        taken = await take(request)
        # The token budget is reserved once the body is read: its estimate needs the prompt and max_tokens.
        reservation = await state.budgets.reserve(client, chat_of(taken)) if state.budgets is not None else None
    except RelayError as error:
        await admission.release()
        return refusal(request, error, merge_fields(admission.headers, error.headers), respond)
    except BaseException:  # cancelled (the server going down), or a bug: the slot goes back all the same
        await admission.release()
        raise
    return Admitted(taken, admission, client, reservation)


__all__ = [
    "Admitted",
    "accept_chat",
    "admit_then",
    "check_host",
    "check_origin",
    "expect_handler",
    "negotiated_framing",
    "read_body",
    "read_chat_request",
    "read_json_body",
    "refusal",
    "send_continue",
]
