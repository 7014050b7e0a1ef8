"""A fake OpenAI-compatible upstream on loopback, speaking the real ``chat.completion.chunk`` SSE wire format.

Tests start it, point the real `openai` client at it, pick a `Behavior` (tokens, pace, and a fault), and read
back what it saw: each request's body and headers, and whether and when the client closed the connection.
It also runs alone for benchmarks: ``python -m tests.fake_upstream --port 9001 --tokens 200 --delay 0.02``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import time
import zlib
from dataclasses import dataclass, field, replace
from typing import Any

from aiohttp import web

FAULTS = (
    "none",
    "status",  # answer `status` (with Retry-After when retry_after is set) before streaming
    "hang_headers",  # never send response headers
    "reset",  # abort the connection after `fault_after` tokens
    "malformed",  # a chunk that is not JSON after `fault_after` tokens
    "stall",  # stop sending after `fault_after` tokens, keep the connection open
    "no_done",  # end the body after the tokens, without finish_reason or [DONE]
    "error_chunk",  # an in-stream {"error": ...} object after `fault_after` tokens
    "error_field",  # an SSE `error:` field line after `fault_after` tokens, then [DONE] (older llama.cpp servers)
    "no_finish",  # the tokens, then [DONE] without a finish_reason
    "flood",  # after `fault_after` tokens, `flood` repeated up to `flood_bytes`, as fast as the relay reads
    "flood_after_done",  # the whole reply, then `flood` repeated up to `flood_bytes` after [DONE]
)


@dataclass
class Behavior:
    tokens: list[str] = field(default_factory=lambda: ["Hello", ",", " world", "!"])
    delay: float = 0.0  # seconds between tokens
    first_delay: float = 0.0  # seconds before the first token (after the headers)
    headers_delay: float = 0.0  # seconds before the response headers
    fault: str = "none"
    fault_after: int = 0
    status: int = 500
    retry_after: str | None = None
    error_body: dict[str, Any] | None = None
    usage: bool = True
    crlf: bool = False  # use CRLF line endings, as some servers do
    gzip: bool = False  # compress the body (Content-Encoding: gzip, flushed at every write), as some proxies do
    content_encoding: str | None = None  # a Content-Encoding header to send (the body is not changed)
    flood: bytes = b""  # what the "flood" faults repeat (compressed like the rest of the body when gzip is set)
    flood_bytes: int = 0  # how much of it, before compression
    done_line: str = "data: [DONE]"  # the line that ends the stream
    choices: int = 1  # choices per content chunk, in reverse index order (n > 1 forced by an upstream or proxy)
    chaos: float = 0.0  # the share of requests that get a random fault instead (soak tests)
    keep_alive: bool = True  # False: Connection: close, so that every request needs a new connection
    # A reasoning model's thinking, streamed before the tokens (paced by `delay` too) in `reasoning_field`:
    # reasoning_content (DeepSeek, vLLM) or reasoning (vLLM, Groq).
    reasoning: list[str] = field(default_factory=list)
    reasoning_field: str = "reasoning_content"
    # Tool calls streamed after the tokens, OpenAI's way: (id, name, argument fragments); the finish reason is then
    # tool_calls.
    tool_calls: list[tuple[str, str, list[str]]] = field(default_factory=list)
    refusal: list[str] = field(default_factory=list)  # refusal pieces streamed after the tokens
    # A recorded body to send as it is instead (a real upstream's chunks, [DONE] included), after the headers.
    raw_body: bytes | None = None


@dataclass
class Seen:
    """One request as the upstream saw it."""

    body: dict[str, Any]
    headers: dict[str, str]
    started_at: float
    closed_by_client_at: float | None = None  # the client went away before we finished
    completed: bool = False
    tokens_sent: int = 0
    client_gone: asyncio.Event = field(default_factory=asyncio.Event)
    # The upstream's side of the connection: a test can look at the socket itself (has the client's FIN arrived?).
    transport: asyncio.BaseTransport | None = None


def _chunk(content: str | None = None, finish: str | None = None, role: bool = False) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = "assistant"
    if content is not None:
        delta["content"] = content
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "fake-model",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def _delta_chunk(delta: dict[str, Any]) -> dict[str, Any]:
    """A chunk whose delta is `delta` (reasoning, tool calls, a refusal)."""
    body = _chunk()
    body["choices"][0]["delta"] = delta
    return body


def _random_fault(behavior: Behavior, rng: random.Random) -> Behavior:
    fault = rng.choice(["status", "reset", "malformed", "stall", "no_done", "error_chunk", "hang_headers"])
    return replace(
        behavior,
        fault=fault,
        fault_after=rng.randrange(max(1, len(behavior.tokens))),
        status=rng.choice([400, 401, 404, 429, 500, 503]),
    )


def _choices_chunk(token: str, count: int) -> dict[str, Any]:
    """A content chunk with `count` choices, the last first: choice 0 says `token`, the others something else."""
    body = _chunk(content=token)
    body["choices"] = [
        {"index": i, "delta": {"content": token if i == 0 else f"<choice {i}>"}, "logprobs": None,
         "finish_reason": None}
        for i in reversed(range(count))
    ]  # fmt: skip
    return body


class FakeUpstream:
    def __init__(self, behavior: Behavior | None = None) -> None:
        self.behavior = behavior or Behavior()
        # A request whose last message has one of these contents gets that behavior instead (concurrent tests).
        self.by_prompt: dict[str, Behavior] = {}
        self.seen: list[Seen] = []
        self.app = web.Application()
        self.app.router.add_post("/v1/chat/completions", self._completions)
        self.app.router.add_get("/v1/models", self._models)
        self._runner: web.AppRunner | None = None
        self._random = random.Random(1234)
        self.url = ""

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        # handler_cancellation: the handler is cancelled the moment the client's connection closes, which is
        # exactly the event the tests measure.
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server
        assert server is not None
        sockets = getattr(server, "sockets", [])
        bound_port = sockets[0].getsockname()[1]
        self.url = f"http://{host}:{bound_port}/v1"
        return self.url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def last(self) -> Seen:
        return self.seen[-1]

    async def wait_for_request(self, count: int = 1, timeout: float = 5.0) -> Seen:
        async with asyncio.timeout(timeout):
            while len(self.seen) < count:
                await asyncio.sleep(0.002)
        return self.seen[count - 1]

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen = Seen(body=body, headers=dict(request.headers), started_at=time.monotonic(), transport=request.transport)
        self.seen.append(seen)
        messages = body.get("messages") or [{}]
        b = self.by_prompt.get(str(messages[-1].get("content")), self.behavior)
        if b.chaos and self._random.random() < b.chaos:
            b = _random_fault(b, self._random)
        try:
            return await self._respond(request, seen, b)
        except (asyncio.CancelledError, ConnectionError):
            seen.closed_by_client_at = time.monotonic()
            seen.client_gone.set()
            raise

    async def _respond(self, request: web.Request, seen: Seen, b: Behavior) -> web.StreamResponse:
        if b.headers_delay:
            await asyncio.sleep(b.headers_delay)
        if b.fault == "hang_headers":
            await asyncio.sleep(3600)
        if b.fault == "status":
            headers = {"Retry-After": b.retry_after} if b.retry_after is not None else {}
            error = b.error_body or {
                "error": {"message": "Incorrect API key provided: sk-secret-upstream-key", "type": "invalid_request"}
            }
            return web.json_response(error, status=b.status, headers=headers)
        eol = "\r\n" if b.crlf else "\n"
        headers = {"Content-Type": "text/event-stream; charset=utf-8"}
        # Compressed here, not by aiohttp (whose compression holds everything until the end of the body): a flood
        # of a gigabyte is compressed block by block as the relay reads it, never held whole.
        packer = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS) if b.gzip else None
        if packer is not None:
            headers["Content-Encoding"] = "gzip"
        if b.content_encoding is not None:
            headers["Content-Encoding"] = b.content_encoding
        response = web.StreamResponse(headers=headers)
        if not b.keep_alive:
            response.force_close()
        await response.prepare(request)

        async def write(data: bytes) -> None:
            if packer is not None:
                data = packer.compress(data) + packer.flush(zlib.Z_SYNC_FLUSH)
            await response.write(data)

        async def send(obj: dict[str, Any] | str) -> None:
            data = obj if isinstance(obj, str) else json.dumps(obj)
            await write(f"data: {data}{eol}{eol}".encode())

        async def flood() -> None:
            block = b.flood * max(1, (1 << 20) // max(1, len(b.flood)))
            total = b.flood_bytes - b.flood_bytes % max(1, len(b.flood))  # whole repetitions only
            sent = 0
            while sent < total:
                piece = block[: total - sent]
                await write(piece)
                sent += len(piece)
                # A write only waits when the relay's socket is full, and a compressed block is small: without
                # this the fake, which shares the test's event loop, would be the one freezing it.
                await asyncio.sleep(0)

        if b.raw_body is not None:
            await write(b.raw_body)
            await response.write_eof()
            seen.completed = True
            return response
        await send(_chunk(content="", role=True))
        if b.first_delay:
            await asyncio.sleep(b.first_delay)
        for index, thought in enumerate(b.reasoning):
            if index and b.delay:
                await asyncio.sleep(b.delay)
            await send(_delta_chunk({b.reasoning_field: thought, "content": None}))
        for index, token in enumerate(b.tokens):
            if index == b.fault_after and b.fault in {"reset", "malformed", "stall", "error_chunk", "error_field",
                                                      "flood"}:  # fmt: skip
                if b.fault == "reset":
                    assert request.transport is not None
                    request.transport.abort()
                    seen.completed = True
                    return response
                if b.fault == "malformed":
                    await write(f"data: {{not json{eol}{eol}".encode())
                elif b.fault == "error_field":
                    error = {"code": 400, "message": "Incorrect API key provided: sk-secret-upstream-key"}
                    await write(f"error: {json.dumps(error)}{eol}{eol}".encode())
                    await send("[DONE]")
                    await response.write_eof()
                    seen.completed = True
                    return response
                elif b.fault == "flood":
                    await flood()
                elif b.fault == "error_chunk":
                    await send(
                        {"error": {"message": "The server had an error (secret detail)", "type": "server_error"}}
                    )
                elif b.fault == "stall":
                    await asyncio.sleep(3600)
            if index and b.delay:
                await asyncio.sleep(b.delay)
            await send(_chunk(content=token) if b.choices == 1 else _choices_chunk(token, b.choices))
            seen.tokens_sent += 1
        for index, (call_id, name, fragments) in enumerate(b.tool_calls):
            first = {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
            await send(_delta_chunk({"tool_calls": [first]}))
            for fragment in fragments:
                if b.delay:
                    await asyncio.sleep(b.delay)
                await send(_delta_chunk({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}))
        for piece in b.refusal:
            await send(_delta_chunk({"refusal": piece}))
        if b.fault != "no_done":
            if b.fault != "no_finish":
                await send(_chunk(finish="tool_calls" if b.tool_calls else "stop"))
            if b.usage and seen.body.get("stream_options", {}).get("include_usage"):
                n = len(b.tokens)
                await send(
                    {
                        "id": "chatcmpl-fake",
                        "object": "chat.completion.chunk",
                        "created": 1700000000,
                        "model": "fake-model",
                        "choices": [],
                        "usage": {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n},
                    }
                )
            await write(f"{b.done_line}{eol}{eol}".encode())
            if b.fault == "flood_after_done":
                await flood()
        if packer is not None:
            await response.write(packer.flush())
        await response.write_eof()
        seen.completed = True
        return response


async def _serve(args: argparse.Namespace) -> None:
    tokens = [f" tok{i}".ljust(args.token_bytes, ".") for i in range(args.tokens)]
    upstream = FakeUpstream(Behavior(tokens=tokens, delay=args.delay, chaos=args.chaos))
    url = await upstream.start(args.host, args.port)
    print(f"fake upstream at {url}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await upstream.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="A fake OpenAI-compatible streaming upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--token-bytes", type=int, default=0, help="pad every token to this length")
    parser.add_argument("--chaos", type=float, default=0.0, help="share of requests that get a random fault")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
