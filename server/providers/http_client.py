"""The `openai` client's HTTP client: httpx's interface, one `aiohttp.ClientSession` underneath, nothing between.

The openai package accepts any ``httpx.AsyncClient`` as its HTTP client and calls two of its methods per request:
``build_request`` and ``send``. httpx's own merge a base URL, default headers, cookies and query parameters into
every request (parsing its URL again on the way) and then pass it through their auth, redirect, cookie and logging
layers to a transport; the package's ``DefaultAioHttpClient`` converts it there into an aiohttp request. By the
time it calls ``build_request`` the openai client has built the whole request (its absolute URL, every header and
the body) and authenticated it with a header itself, so none of those layers has anything left to do.
`AiohttpClient` keeps httpx's interface and skips them:

    openai client ─ build_request(method, url, headers, content, timeout) ─▶ httpx.Request (URL parsed once per URL)
                  ─ send(request, stream=True) ─▶ AiohttpTransport ─▶ aiohttp.ClientSession.request ─▶ upstream
                  ◀─ httpx.Response (status, headers, the body as read by aiohttp; the aiohttp response in its
                     extensions under `AIOHTTP_RESPONSE`, for the provider to read and abort directly)

What it keeps of httpx's behaviour: the client's default headers under the request's own (``Accept-Encoding:
gzip, deflate``: the codings `server.content_coding` decodes); the per-request timeouts (connect, read, pool) as
aiohttp's; redirects followed (aiohttp's rules are httpx's: a 301/302/303 POST becomes a GET, 307/308 keep the
body, credentials are dropped on a redirect to another origin; one difference: aiohttp counts an upgrade from
http to https on the same host as another origin, httpx does not); a proxy named by the environment
(``HTTPS_PROXY``, ``NO_PROXY``…), read once per upstream host; TLS verified as httpx does (its
``create_ssl_context``, ``SSL_CERT_FILE``/``SSL_CERT_DIR``); aiohttp's errors as the httpx errors the openai client
maps and retries (a refused connection is ``ConnectError``, a connect timeout ``ConnectTimeout``, a read timeout
``ReadTimeout``, a lost connection ``ReadError``). What it drops on purpose: cookies (the relay serves many clients
through one upstream session, and an upstream's cookies, a CDN's bot-management one for instance, are not theirs
to share). A request that asks for anything else of httpx (its own auth, per-request redirect settings, files,
query parameters, cookies) goes through httpx's own methods, to the same transport.
"""

from __future__ import annotations

import functools
import urllib.request
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import aiohttp
import httpx2

# The key of `httpx2.Response.extensions` under which the transport leaves the `aiohttp.ClientResponse`.
AIOHTTP_RESPONSE = "llm_relay.aiohttp_response"

# Read size of the body for httpx's own readers (``aiter_raw``, ``aread``), as the package's transport reads.
_CHUNK_SIZE = 16 * 1024

# httpx's limit on followed redirects (``DEFAULT_MAX_REDIRECTS``).
_MAX_REDIRECTS = 20


def _httpx_error(exc: aiohttp.ClientError) -> httpx2.TransportError:
    """The httpx error the openai client expects for an aiohttp one: it retries those before any response and maps
    timeouts to ``APITimeoutError`` and the rest to ``APIConnectionError``."""
    message = str(exc) or type(exc).__name__
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx2.ConnectTimeout(message)
    if isinstance(exc, aiohttp.ServerTimeoutError):  # the socket read timeout, and any other of aiohttp's
        return httpx2.ReadTimeout(message)
    if isinstance(exc, aiohttp.ClientConnectorError):  # refused, unreachable, DNS, TLS: before a byte was sent
        return httpx2.ConnectError(message)
    if isinstance(exc, (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError)):
        return httpx2.UnsupportedProtocol(message)
    if isinstance(exc, aiohttp.ClientPayloadError):
        return httpx2.ReadError(message)
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientResponseError)):
        return httpx2.RemoteProtocolError(message)
    return httpx2.ReadError(message)


class _Body(httpx2.AsyncByteStream):
    """A response body for httpx's readers; the relay's provider reads the aiohttp response directly."""

    __slots__ = ("_response",)

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_chunked(_CHUNK_SIZE):
                yield chunk
        except aiohttp.ClientError as exc:
            raise _httpx_error(exc) from exc

    async def aclose(self) -> None:
        # An unread body cannot be reused: release() then closes the connection instead of pooling it.
        self._response.release()
        await self._response.wait_for_close()


def _aiohttp_timeout(timeouts: Mapping[str, float | None]) -> aiohttp.ClientTimeout:
    """httpx's per-request timeouts (its ``timeout`` extension) as aiohttp's."""
    return _client_timeout(timeouts.get("connect"), timeouts.get("read"), timeouts.get("pool"))


@functools.lru_cache(maxsize=16)  # a handful at most: the openai client sends its one timeout with every request
def _client_timeout(connect: float | None, read: float | None, pool: float | None) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=None, sock_connect=connect, sock_read=read, connect=pool)


@functools.lru_cache(maxsize=64)  # the relay sends every request to the same URL: parsed once, not per request
def _absolute_url(url: str) -> httpx2.URL | None:
    """`url` parsed; None for a relative URL, which httpx's own method merges with the client's base URL."""
    parsed = httpx2.URL(url)
    return None if parsed.is_relative_url else parsed


def environment_proxy(scheme: str, host: str) -> str | None:
    """The proxy the environment names for `host` over `scheme` (``HTTPS_PROXY``, ``HTTP_PROXY``, ``ALL_PROXY``,
    less ``NO_PROXY``), as httpx's ``trust_env`` picks it; None for none."""
    if not host or urllib.request.proxy_bypass(host):
        return None
    proxies = urllib.request.getproxies()
    return proxies.get(scheme) or proxies.get("all") or None


class AiohttpTransport(httpx2.AsyncBaseTransport):
    """An httpx transport sending through one `aiohttp.ClientSession`, made on the first request (a session
    belongs to the event loop that runs it). Redirects are httpx's to follow when it calls; `send` follows them
    in aiohttp instead."""

    def __init__(self, *, max_connections: int, keepalive_expiry: float | None) -> None:
        self._max_connections = max_connections
        self._keepalive_expiry = keepalive_expiry
        # Made here, not with the session: loading the CA bundle takes tens of milliseconds the loop need not wait.
        self._ssl = httpx2.create_ssl_context()
        self._session: aiohttp.ClientSession | None = None
        # The environment's proxy by (scheme, host), read once per upstream host (and per redirect target).
        self._proxies: dict[tuple[str, str], str | None] = {}

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=self._max_connections,  # aiohttp reads 0 as no limit
            keepalive_timeout=self._keepalive_expiry,
            ssl=self._ssl,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,  # the provider decodes the content coding itself, in bounded pieces
        )
        return self._session

    def _proxy(self, url: httpx2.URL) -> str | None:
        key = (url.scheme, url.host)
        if key not in self._proxies:
            if len(self._proxies) >= 64:
                self._proxies.clear()
            self._proxies[key] = environment_proxy(*key)
        return self._proxies[key]

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        return await self.send(request, follow_redirects=False)

    async def send(self, request: httpx2.Request, *, follow_redirects: bool) -> httpx2.Response:
        """Send `request` through the session, aiohttp following redirects when `follow_redirects`."""
        session = self._session or self._open()
        try:
            body: bytes | None = request.content or None
        except httpx2.RequestNotRead:  # a streamed upload: read it first (the relay sends none)
            body = await request.aread() or None
        url = request.url
        netloc = url.netloc.decode("ascii")
        try:
            response = await session.request(
                request.method,
                str(url),
                # Host and Content-Length as aiohttp makes them, from the URL and the body, so that a redirect's
                # request has its own; a Host the caller chose (one that is not the URL's) goes as it is.
                headers=[
                    (k, v)
                    for k, v in request.headers.multi_items()
                    if not (k == "content-length" or (k == "host" and v == netloc))
                ],
                data=body,
                allow_redirects=follow_redirects,
                max_redirects=_MAX_REDIRECTS,
                timeout=_aiohttp_timeout(request.extensions.get("timeout", {})),
                proxy=self._proxy(url),
            )
        except aiohttp.ClientError as exc:
            raise _httpx_error(exc) from exc
        return httpx2.Response(
            response.status,
            headers=response.raw_headers,
            stream=_Body(response),
            request=request,
            extensions={AIOHTTP_RESPONSE: response},
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


class AiohttpClient(httpx2.AsyncClient):
    """An ``httpx.AsyncClient`` for the openai client, sending through `AiohttpTransport` without httpx's layers
    (see the module's doc)."""

    def __init__(self, *, timeout: httpx2.Timeout, max_connections: int, follow_redirects: bool = True) -> None:
        self._relay_transport = AiohttpTransport(
            max_connections=max_connections,
            keepalive_expiry=5.0,  # httpx's default: aiohttp keeps every idle connection until then
        )
        # trust_env=False: the transport reads the environment's proxy for each upstream host itself.
        super().__init__(
            timeout=timeout,
            follow_redirects=follow_redirects,
            trust_env=False,
            transport=self._relay_transport,
        )
        self._default_headers = list(self.headers.multi_items())

    def build_request(
        self,
        method: str,
        url: httpx2.URL | str,
        *,
        content: Any = None,
        data: Any = None,
        files: Any = None,
        json: Any = None,
        params: Any = None,
        headers: Any = None,
        cookies: Any = None,
        timeout: Any = httpx2.USE_CLIENT_DEFAULT,
        extensions: Any = None,
    ) -> httpx2.Request:
        parsed = _absolute_url(url) if isinstance(url, str) else None
        if (
            parsed is None
            or not isinstance(content, (bytes, type(None)))
            or not isinstance(headers, Sequence)
            or any(x is not None for x in (data, files, json, params, cookies, extensions))
            or not isinstance(timeout, httpx2.Timeout)
        ):
            return super().build_request(
                method,
                url,
                content=content,
                data=data,
                files=files,
                json=json,
                params=params,
                headers=headers,
                cookies=cookies,
                timeout=timeout,
                extensions=extensions,
            )
        return httpx2.Request(
            method,
            parsed,
            content=content,
            headers=self._with_defaults(headers),
            extensions={"timeout": timeout.as_dict()},
        )

    def _with_defaults(self, headers: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        """The client's default headers, less those the request sets, then the request's (httpx's merge)."""
        named = {name.lower() for name, _ in headers}
        return [(name, value) for name, value in self._default_headers if name.lower() not in named] + list(headers)

    async def send(
        self,
        request: httpx2.Request,
        *,
        stream: bool = False,
        auth: Any = httpx2.USE_CLIENT_DEFAULT,
        follow_redirects: Any = httpx2.USE_CLIENT_DEFAULT,
    ) -> httpx2.Response:
        if auth is not httpx2.USE_CLIENT_DEFAULT or follow_redirects is not httpx2.USE_CLIENT_DEFAULT or self.is_closed:
            return await super().send(request, stream=stream, auth=auth, follow_redirects=follow_redirects)
        response = await self._relay_transport.send(request, follow_redirects=self.follow_redirects)
        if not stream:
            try:
                await response.aread()
            finally:
                await response.aclose()
        return response


__all__ = ["AIOHTTP_RESPONSE", "AiohttpClient", "AiohttpTransport", "environment_proxy"]
