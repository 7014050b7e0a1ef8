"""What-if variants of our server for the relay scenarios: measured proposals for server/, not shipped code.

``python -m bench.ours --bench-variant NAME ...`` applies one before the server starts:

* ``aiohttp-provider``: the upstream read with ``aiohttp.ClientSession`` directly, decoded by our own
  `ChunkStreamDecoder`, with no openai or httpx objects per request or per chunk (our server already runs the
  openai client on aiohttp, ``openai.DefaultAioHttpClient``; this goes one step further). A prototype: it maps only
  the errors the bench can produce, so it shows what the hot path would cost, not a finished provider.

One more takes a micro-optimisation of server/ back out, to re-measure on the paced relay what a zero-delay or
micro-benchmark figure justified (issue 17): if ours is no slower without it there, it does not pay. (A second,
``no-write-fast-path``, measured the reader's skipping of the write timer: 54.6 vs 54.0 CPU-µs per token at 500
paced streams, bench/results/micro-ab/, so the fast path was removed from server/reader.py.)

* ``plain-json-framing``: a delta's text is encoded by the framing's general ``json_bytes`` instead of calling
  the C string encoder directly (server/framing.py's ``_json_str``).

And one takes out what later features added to every request, to compare the stream core alone with a core that
had none of them (issue 13's baseline, 00c4d06):

* ``no-observability``: no access line (``--log-level warning``) and no Prometheus metrics (``--metrics false``),
  set through their environment variables, which the server reads as it parses its options.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Sequence
from typing import Any

VARIANTS = ("aiohttp-provider", "plain-json-framing", "no-observability")


class AiohttpProvider:
    name = "openai"

    def __init__(self, base_url: str, api_key: str) -> None:
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._headers = {
            "Authorization": f"Bearer {api_key}",
            "Content-Type": "application/json",
            "Accept": "text/event-stream",
        }
        self._session: Any = None

    async def stream(self, request: Any) -> AsyncGenerator[Sequence[Any], None]:
        import aiohttp

        from server.errors import UpstreamError, UpstreamUnavailable
        from server.upstream_sse import ChunkStreamDecoder

        if self._session is None:
            # No pool limit and no total timeout: the relay's own clocks bound a stream, as with the openai client.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            )
        body = {
            "model": request.model,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        try:
            async with self._session.post(self._url, data=json.dumps(body).encode(), headers=self._headers) as response:
                if response.status != 200:
                    raise UpstreamError(f"the model provider answered HTTP {response.status}")
                decoder = ChunkStreamDecoder()
                async for data in response.content.iter_any():
                    events = decoder.feed(data)
                    if events:
                        yield events
                tail = decoder.end()
                if tail:
                    yield tail
        except aiohttp.ClientError:
            raise UpstreamUnavailable("could not reach the model provider") from None

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def apply(name: str) -> None:
    if name == "aiohttp-provider":
        import server.app

        original = server.app.build_provider

        def build_provider(config: Any) -> Any:
            if config.resolved_provider == "openai":
                return AiohttpProvider(config.base_url, config.api_key or "unused")
            return original(config)

        server.app.build_provider = build_provider
    elif name == "no-observability":
        import os

        os.environ["LLM_RELAY_LOG_LEVEL"] = "warning"
        os.environ["LLM_RELAY_METRICS"] = "false"
    elif name == "plain-json-framing":
        import server.framing

        server.framing._json_str = server.framing.json_bytes
    else:
        raise SystemExit(f"unknown bench variant {name!r}; known: {', '.join(VARIANTS)}")
