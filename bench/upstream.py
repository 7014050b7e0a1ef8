"""A fast fake OpenAI-compatible upstream for the relay scenarios: a bare ``asyncio.Protocol``, pre-encoded chunks.

It speaks the real ``chat.completion.chunk`` SSE wire format (a role chunk, one chunk per token, a finish chunk, a
usage chunk when asked, ``[DONE]``) over HTTP/1.1 keep-alive with chunked bodies, and is cheap enough to share
core 1 with the load client (tests/fake_upstream.py, on aiohttp, would cost more than the relays it feeds).

The reply is chosen by the prompt, so one upstream serves every relay scenario through relays that were started
once: ``"n=50 d=0.02 f=0 id=track7"`` asks for 50 tokens, 20 ms apart, the first one ``f`` seconds after the
role chunk (at once with ``f=0``, so a time to first token is the relays' and not the model's); a reply longer
than the payload repeats its tokens (up to `MAX_TOKENS`). With ``s=1`` every token's text ends with its
generation stamp, ``~t<CLOCK_MONOTONIC in µs>~``, taken when the token is written: relays copy the text into their
own framing, so the load client (same machine, same clock) reads each token's relay-added lag as its receipt time
minus that stamp, whatever the relay's output format. For a request whose ``id`` starts with ``track`` it records
when the request started, when the relay closed the connection before the reply was complete, and when the reply
completed (the disconnect scenario). ``GET /stats`` returns those records as JSON; ``POST /reset`` forgets them.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time
from typing import Any, cast

from bench.payload import tokens as payload_tokens

MAX_TOKENS = 4096
_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
    b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
)


def _event(obj: dict[str, Any] | str) -> bytes:
    data = (obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))).encode()
    frame = b"data: " + data + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(frame), frame)


def stamp_marker(micros: int) -> str:
    """The text appended to a stamped token: ASCII that every JSON encoder copies as it is."""
    return f"~t{micros}~"


def _chunk(delta: dict[str, str], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "fake-model",
        "system_fingerprint": "fp_bench",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


class Reply:
    """The pre-encoded pieces of every reply."""

    def __init__(self, tokens: list[str]) -> None:
        self.first = _SSE_HEAD + _event(_chunk({"role": "assistant", "content": ""}))
        texts = list(itertools.islice(itertools.cycle(tokens), MAX_TOKENS))
        self.tokens = [_event(_chunk({"content": t})) for t in texts]
        # A stamped token's event, split around where its stamp goes: (b"data: {..." , b"...}\n\n").
        self.stamped: list[tuple[bytes, bytes]] = []
        for text in texts:
            event = "data: " + json.dumps(_chunk({"content": text + stamp_marker(0)}), separators=(",", ":")) + "\n\n"
            head, _, tail = event.encode().partition(stamp_marker(0).encode())
            self.stamped.append((head + b"~t", b"~" + tail))
        self.finish = _event(_chunk({}, "stop"))
        self.done = _event("[DONE]") + b"0\r\n\r\n"
        self._joined: dict[int, bytes] = {}
        self._usage: dict[int, bytes] = {}

    def all_tokens(self, n: int) -> bytes:
        joined = self._joined.get(n)
        if joined is None:
            joined = self._joined[n] = b"".join(self.tokens[:n])
        return joined

    def stamped_token(self, index: int) -> bytes:
        head, tail = self.stamped[index]
        frame = b"%s%d%s" % (head, time.monotonic_ns() // 1000, tail)
        return b"%x\r\n%s\r\n" % (len(frame), frame)

    def usage(self, n: int) -> bytes:
        usage = self._usage.get(n)
        if usage is None:
            counts = {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": n + 7}
            usage = self._usage[n] = _event({**_chunk({}), "choices": [], "usage": counts})
        return usage


class Record:
    __slots__ = ("closed", "completed", "sent", "started")

    def __init__(self, started: float) -> None:
        self.started = started
        self.closed: float | None = None
        self.completed: float | None = None
        self.sent = 0


class Upstream:
    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.records: dict[str, Record] = {}


def parse_prompt(prompt: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in prompt.split() if "=" in part)


class UpstreamProtocol(asyncio.Protocol):
    def __init__(self, upstream: Upstream) -> None:
        self.up = upstream
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.busy = False
        self.record: Record | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.index = 0
        self.count = 0
        self.delay = 0.0
        self.due = 0.0
        self.usage = False
        self.stamps = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.busy:
            self._next_request()

    def _next_request(self) -> None:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buffer[:end]
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(self.buffer) < end + 4 + length:
            return
        body = self.buffer[end + 4 : end + 4 + length]
        self.buffer = self.buffer[end + 4 + length :]
        path = head.split(b" ", 2)[1]
        if path.endswith(b"/chat/completions"):
            self.busy = True
            self._completions(json.loads(body))
        elif path.endswith(b"/stats"):
            stats = {k: {s: getattr(r, s) for s in Record.__slots__} for k, r in self.up.records.items()}
            self._json(stats)
        elif path.endswith(b"/reset"):
            self.up.records.clear()
            self._json({})
        else:
            self._json({"error": "not found"}, b"404 Not Found")

    def _json(self, obj: object, status: bytes = b"200 OK") -> None:
        assert self.transport is not None
        body = json.dumps(obj).encode()
        self.transport.write(
            b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (status, len(body), body)
        )
        # Control requests are rare: one connection each keeps the client side trivial.
        self.transport.close()

    def _completions(self, body: dict[str, Any]) -> None:
        assert self.transport is not None
        now = self.loop.time()
        params = parse_prompt(str(body["messages"][-1]["content"]))
        key = params.get("id", "")
        self.record = None
        if key.startswith("track"):
            self.record = self.up.records[key] = Record(time.monotonic())
        self.usage = bool((body.get("stream_options") or {}).get("include_usage"))
        reply = self.up.reply
        self.count = min(len(reply.tokens), int(params.get("n", "50")))
        self.delay = float(params.get("d", "0"))
        self.stamps = params.get("s") == "1"
        first_delay = float(params.get("f", "0"))
        self.transport.write(reply.first)
        self.index = 0
        if not self.delay and not first_delay:
            if self.stamps:
                self.transport.write(b"".join(reply.stamped_token(i) for i in range(self.count)))
            else:
                self.transport.write(reply.all_tokens(self.count))
            self.index = self.count
            self._finish()
            return
        self.due = now + first_delay
        if first_delay:
            self.timer = self.loop.call_at(self.due, self._step)
        else:
            self._step()

    def _step(self) -> None:
        if self.transport is None:
            return
        reply = self.up.reply
        self.transport.write(reply.stamped_token(self.index) if self.stamps else reply.tokens[self.index])
        self.index += 1
        if self.record is not None:
            self.record.sent = self.index
        if self.index >= self.count:
            self._finish()
            return
        # Due times, not sleeps: a late tick does not delay the rest of the reply (an ideal pacer).
        self.timer = self.loop.call_at(self.due + self.index * self.delay, self._step)

    def _finish(self) -> None:
        assert self.transport is not None
        reply = self.up.reply
        self.transport.write(reply.finish + (reply.usage(self.count) if self.usage else b"") + reply.done)
        if self.record is not None:
            self.record.sent = self.index
            self.record.completed = time.monotonic()
        self.record = None
        self.timer = None
        self.busy = False
        self._next_request()

    def eof_received(self) -> bool | None:
        self._closed()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed()
        self.transport = None

    def _closed(self) -> None:
        if self.record is not None and self.record.closed is None:
            self.record.closed = time.monotonic()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


async def serve(port: int) -> None:
    upstream = Upstream(Reply(payload_tokens()))
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: UpstreamProtocol(upstream), "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description="fast fake OpenAI-compatible upstream")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    import uvloop

    uvloop.run(serve(args.port))


if __name__ == "__main__":
    main()
