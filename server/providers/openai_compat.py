"""Relay an OpenAI-compatible upstream (OpenAI, DeepSeek, vLLM, Ollama…) through the official `openai` client.

The client builds and authenticates the request, applies its retries (which can only happen before the response
starts, so never after a token was relayed) and maps HTTP failures to its error types. The request goes through
the client's own ``post`` (the way the package documents for requests it has no typed method for) asking for the
raw, unread response, as ``with_streaming_response`` does; the body is decoded by `ChunkStreamDecoder`. Measured
per request, ``chat.completions.with_streaming_response.create`` spends about 900 CPU-µs here, a third of it
re-walking the messages through the typed-dict transform (a no-op for our plain strings); ``post`` with the same
body spends about 680. Per chunk, `ChunkStreamDecoder` costs a few microseconds instead of the ~100 µs of building
a ``ChatCompletionChunk`` model.

Failure mapping (the messages never contain the API key or the upstream's own text, which can quote it):

    out of file descriptors (EMFILE/ENFILE)  -> OutOfDescriptors (503 server_overloaded, Retry-After), the relay's
                                                own limit, not the provider's failure; warned once per episode
    connection refused, DNS failure, reset   -> UpstreamUnavailable (502)
    connect or read timeout                  -> UpstreamTimeout (504)
    HTTP 429                                 -> UpstreamRateLimited (503, Retry-After passed on, at most 3600 s)
    HTTP 401 / 403                           -> UpstreamError (502), "rejected the relay's credentials"
    any other HTTP status                    -> UpstreamError (502), naming the status
    an error object or SSE error field       -> UpstreamError (502), naming its code when it is an HTTP status
    malformed chunk, early end, [DONE] with
    no text and no finish_reason, oversized
    event, a flood without events, a content
    coding the relay did not offer           -> UpstreamProtocolError (502)

An upstream never holds the event loop: the body is decoded at most `_TURN_BYTES` per loop turn, a compressed body
is inflated in pieces of at most `_READ_SIZE`, and the decoder's bounds (`upstream_sse`) end a flood of lines,
comments or newlines after a few MiB. Valid events that carry no progress (no text, reasoning, refusal or tool
call) yield no batch, so the relay's first-token and idle timeouts (which only progress moves) end a flood of those.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any, cast

import aiohttp
import httpx2
import openai
from openai.types.chat import ChatCompletion

from ..chat_request import ChatRequest
from ..content_coding import IDENTITY, BoundedInflater, content_coding
from ..descriptors import out_of_descriptors, warn_out_of_descriptors
from ..disconnect import close_now
from ..errors import (
    OutOfDescriptors,
    RelayError,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from ..events import Event
from ..json_wire import json_bytes
from ..observe import current_request_id
from ..upstream_sse import ChunkStreamDecoder
from .base import on_abort, report_upstream_status
from .http_client import AIOHTTP_RESPONSE, AiohttpClient

# At most this much of the upstream body per read, so a batch (and the write it becomes) stays small: a client that
# stopped reading then holds about the transport's high-water mark plus one batch, not whatever the upstream
# reader had buffered (reading everything buffered made 1.4 MB per stalled stream in the soak test).
_READ_SIZE = 16 * 1024

# Decoded bytes between two turns of the event loop (see `stream`): a turn decodes at most this much, a few
# milliseconds of work even for the costliest input (a read of nothing but line ends), so an upstream that floods
# the relay delays other streams, timers and signals by that much and no more.
_TURN_BYTES = 64 * 1024

# After [DONE], the rest of the body is read only to let the pool reuse the connection: a well-behaved upstream
# has nothing more to send, and one that keeps sending costs its connection instead of the relay's time.
_DRAIN_LIMIT = 64 * 1024

# The longest Retry-After passed on to clients: a larger value from an upstream is more likely a bug than a plan,
# and a client told to wait a day gives up on the service.
MAX_RETRY_AFTER = 3600.0

# The header `with_streaming_response` sets: the client returns the response unread, its body streamed. The
# client's per-request telemetry (its retry count and read timeout) is omitted, as its platform headers are (see
# `make_openai_client`).
_RAW_STREAM: openai.RequestOptions = {
    "headers": {
        "X-Stainless-Raw-Response": "stream",
        "X-Stainless-Retry-Count": openai.omit,
        "X-Stainless-Read-Timeout": openai.omit,
    }
}

# The client's telemetry headers start with this: its package version, the OS, CPU architecture and Python runtime.
_TELEMETRY_PREFIX = "x-stainless-"


def make_openai_client(
    *,
    api_key: str | None,
    base_url: str | None,
    max_retries: int = 2,
    connect_timeout: float = 10.0,
    max_connections: int | None = None,
) -> openai.AsyncOpenAI:
    """An `AsyncOpenAI` client for streaming: no read timeout (the relay's own first-token and idle timeouts
    apply) and a connection pool as large as the number of streams the server admits.

    The HTTP transport is aiohttp (`AiohttpClient`), not the package's default httpx/anyio one: anyio's socket
    stream queues whatever the event loop reads without limit, and under uvloop (which reads up to 32 times per
    wake-up) a stream whose client stopped reading buffered ~2 MB of upstream data. aiohttp's reader pauses the
    socket above its high-water mark, so a stalled stream holds a bounded amount. `AiohttpClient` also sends the
    request the openai client built without httpx's merging, auth, redirect and cookie layers around it, which
    cost about as much as the aiohttp request itself. Its errors reach us as the httpx exception types.
    """
    http_client = AiohttpClient(
        timeout=httpx2.Timeout(None, connect=connect_timeout),
        # aiohttp keeps every idle connection until it expires, so a wave of streams reuses as many connections as
        # it had; its connector reads a limit of 0 as none.
        max_connections=0 if max_connections is None else max_connections,
    )
    client = openai.AsyncOpenAI(
        api_key=api_key or "unused",
        base_url=base_url,
        max_retries=max_retries,
        http_client=http_client,
    )
    # Without the client's telemetry headers (its default headers, omitted the way the package omits its own
    # optional ones): an upstream may be anyone's server, and the relay's OS, architecture and runtime versions are
    # none of its business. It also spares the client re-handling seven headers at each of its layers, about a
    # tenth of its CPU per request.
    telemetry = {name: openai.omit for name in client.default_headers if name.lower().startswith(_TELEMETRY_PREFIX)}
    # (`default_headers` is typed as strings; the client's own defaults hold `omit` this way, OpenAI-Organization.)
    return client.copy(default_headers=cast(dict[str, str], telemetry))


def _retry_after(headers: httpx2.Headers) -> float | None:
    return retry_after_seconds(headers.get("retry-after"))


def retry_after_seconds(value: str | None) -> float | None:
    """An upstream's ``Retry-After`` as seconds to pass on, at most `MAX_RETRY_AFTER`; None when it is not a number.

    RFC 9110 §10.2.3: delay-seconds is ``1*DIGIT``. A decimal fraction is taken too (some servers send one);
    ``inf``, ``nan``, exponents, signs and the rest of what ``float()`` accepts are not delay-seconds.

    >>> retry_after_seconds("7"), retry_after_seconds("1.5"), retry_after_seconds("99999999999")
    (7.0, 1.5, 3600.0)
    >>> retry_after_seconds("inf"), retry_after_seconds("-5"), retry_after_seconds("1e400")
    (None, None, None)
    """
    if value is None:
        return None
    text = value.strip()
    whole, _, fraction = text.partition(".")
    if not (whole.isascii() and whole.isdigit()) or (fraction and not (fraction.isascii() and fraction.isdigit())):
        return None  # an HTTP-date is rare from model APIs: the client gets no hint rather than a wrong one
    if len(whole) > 9:  # more than 31 years: clamp before float() sees a digit string of any length
        return MAX_RETRY_AFTER
    return min(float(text), MAX_RETRY_AFTER)


def chat_completions_url(client: openai.AsyncOpenAI) -> str:
    """``chat/completions`` under the client's base URL, whole. The client sends a whole URL as it is; a path it
    merges with its base URL on every request (a parse and a copy of the URL: a few percent of its work)."""
    return str(client.base_url.join("chat/completions"))


async def post_chat_stream(
    client: openai.AsyncOpenAI, body: dict[str, Any], request_id: str | None = None, *, url: str | None = None
) -> openai.AsyncAPIResponse[Any]:
    """POST `body` to `url` (``chat/completions`` under the client's base URL) through `client`, returning the
    response with its body unread.

    `request_id` goes upstream as ``X-Request-Id``, in the request options' headers: what the typed methods'
    ``extra_headers`` argument becomes, so the upstream's logs can be matched with the relay's. It is the
    request's idempotency key too: unique per request and the same for the client's retries of it, which is what
    the client's own key is (a fresh UUID per request, sent only by clients whose API names a header for it).
    """
    options = _RAW_STREAM
    if request_id is not None:
        options = {"headers": {**_RAW_STREAM["headers"], "X-Request-Id": request_id}, "idempotency_key": request_id}
    return await client.post(
        url or chat_completions_url(client),
        # Serialised here, once: the client would copy the body and serialise it with its own default handler.
        content=json_bytes(body),
        cast_to=openai.AsyncAPIResponse[ChatCompletion],
        options=options,
    )


def aiohttp_response(response: openai.AsyncAPIResponse[Any]) -> aiohttp.ClientResponse | None:
    """The ``aiohttp.ClientResponse`` under the client's response, when its HTTP client is `AiohttpClient` (which
    leaves it in the response's extensions); None for any other."""
    raw = response.http_response.extensions.get(AIOHTTP_RESPONSE)
    return raw if isinstance(raw, aiohttp.ClientResponse) else None


def _drop(raw: aiohttp.ClientResponse) -> None:
    """Drop the upstream connection now. ``ClientResponse.close()`` alone closes the transport on the event loop's
    next turn, which on a saturated loop is measurably later; `close_now` ends it on the wire in this call."""
    connection = raw.connection
    transport = connection.transport if connection is not None else None
    if transport is not None:
        close_now(transport)
    raw.close()


def _raw_body(response: openai.AsyncAPIResponse[Any], raw: aiohttp.ClientResponse | None) -> AsyncIterator[bytes]:
    """The response body as it arrives, still in its content coding, and a synchronous way to drop the upstream
    socket if the client leaves.

    With the relay's HTTP client, `raw` is the ``aiohttp.ClientResponse`` under the response (asked not to
    decompress). Aborting its transport drops the connection at once (`_drop`, registered with `on_abort`), and
    reading its content directly (at most `_READ_SIZE` at a time) skips the client's layers of async iterators (in
    the relay bench's paced scenario the gain was within its noise, 47.5 -> 47.0 CPU-µs per token; the abort is the
    point). Any other HTTP client is read through httpx's public ``aiter_raw``. Neither path decompresses: the
    client's own ``iter_bytes`` would inflate a whole read at once (see `content_coding`).
    """
    if raw is None:
        return response.http_response.aiter_raw(_READ_SIZE)
    on_abort(lambda: _drop(raw))
    return raw.content.iter_chunked(_READ_SIZE)


def _body(response: openai.AsyncAPIResponse[Any]) -> AsyncIterator[bytes]:
    """The decoded body, in pieces of at most `_READ_SIZE` bytes however much a compressed read inflates to."""
    raw = aiohttp_response(response)
    # (aiohttp's headers when it is there: a lookup in httpx's decodes every header on the way.)
    coding = content_coding((raw.headers if raw is not None else response.headers).get("content-encoding"))
    chunks = _raw_body(response, raw)
    return chunks if coding == IDENTITY else _inflated(chunks, BoundedInflater(coding, _READ_SIZE))


async def _inflated(chunks: AsyncIterator[bytes], inflater: BoundedInflater) -> AsyncGenerator[bytes, None]:
    async for chunk in chunks:
        for piece in inflater.feed(chunk):
            yield piece
    inflater.end()


async def _close(body: AsyncIterator[bytes]) -> None:
    """Close what `_body` returned, if it is a generator (aiohttp's chunk iterator has nothing to close)."""
    close = getattr(body, "aclose", None)
    if close is not None:
        await close()


# Descriptors free up as streams end; asyncio waits as long before it accepts connections again.
OUT_OF_DESCRIPTORS_RETRY_AFTER = 1.0


def _out_of_descriptors() -> OutOfDescriptors:
    warn_out_of_descriptors("opening a connection to the model provider")
    return OutOfDescriptors(
        "the server is out of capacity for a moment; try again shortly", retry_after=OUT_OF_DESCRIPTORS_RETRY_AFTER
    )


def _status_error(exc: openai.APIStatusError) -> RelayError:
    status = exc.status_code
    if status == 429:
        return UpstreamRateLimited(
            "the model provider is rate limiting this relay; try again later",
            retry_after=_retry_after(exc.response.headers),
        )
    if status in (401, 403):
        return UpstreamError("the model provider rejected the relay's credentials")
    return UpstreamError(f"the model provider answered HTTP {status}")


class OpenAIProvider:
    name = "openai"

    def __init__(self, client: openai.AsyncOpenAI, *, include_usage: bool = True) -> None:
        self._client = client
        self._url = chat_completions_url(client)
        self._include_usage = include_usage

    def _arguments(self, request: ChatRequest) -> dict[str, Any]:
        # The validated optional fields (tools, tool_choice, stop, top_p, seed, response_format, reasoning_effort…)
        # go on as the client set them; the stream and its usage are the relay's to ask for, whatever the client
        # said (an OpenAI-compatible client's stream=false is assembled from the stream by its endpoint).
        arguments: dict[str, Any] = {
            "model": request.model,
            "messages": [m.as_openai() for m in request.messages],
            "stream": True,
            **request.upstream_fields(),
        }
        if self._include_usage:
            arguments["stream_options"] = {"include_usage": True}
        return arguments

    async def stream(self, request: ChatRequest) -> AsyncGenerator[Sequence[Event], None]:
        try:
            response = await post_chat_stream(
                self._client, self._arguments(request), current_request_id.get(), url=self._url
            )
            report_upstream_status(response.status_code)
            # Leaving this block in any way (end, error, or the relay closing the generator because the client
            # left) closes the HTTP response; an unfinished body cannot be reused, so the connection goes too.
            try:
                decoder = ChunkStreamDecoder()
                since_turn = after_done = 0
                body = _body(response)
                try:
                    async for piece in body:
                        if decoder.finished:
                            # Reading on to the end of the body after [DONE] lets the pool reuse the connection;
                            # an upstream that keeps sending after it is not worth reading: drop the connection.
                            after_done += len(piece)
                            if after_done > _DRAIN_LIMIT:
                                break
                        else:
                            events = decoder.feed(piece)
                            # Never an empty batch: the relay's idle clock must not take bytes for progress.
                            if events:
                                yield events
                        since_turn += len(piece)
                        if since_turn >= _TURN_BYTES:
                            # aiohttp hands out buffered data without a pause: let the loop run other streams,
                            # timers (this stream's own timeouts) and signals before decoding more.
                            since_turn = 0
                            await asyncio.sleep(0)
                finally:
                    await _close(body)
                tail = decoder.end()
                if tail:
                    yield tail
            finally:
                await response.close()
        except openai.APITimeoutError as exc:
            if out_of_descriptors(exc):
                raise _out_of_descriptors() from None
            raise UpstreamTimeout("the model provider did not answer in time") from None
        except openai.APIConnectionError as exc:
            if out_of_descriptors(exc):
                raise _out_of_descriptors() from None
            raise UpstreamUnavailable("could not reach the model provider") from None
        except openai.APIStatusError as exc:
            report_upstream_status(exc.status_code)
            raise _status_error(exc) from None
        except (httpx2.TimeoutException, aiohttp.ServerTimeoutError):
            raise UpstreamTimeout("the model provider stopped answering") from None
        except (httpx2.HTTPError, aiohttp.ClientError) as exc:
            if out_of_descriptors(exc):
                raise _out_of_descriptors() from None
            raise UpstreamUnavailable("the connection to the model provider was lost") from None
        except OSError as exc:  # raised by the client itself, unwrapped (its first request imports a module)
            if not out_of_descriptors(exc):
                raise
            raise _out_of_descriptors() from None

    async def aclose(self) -> None:
        await self._client.close()
