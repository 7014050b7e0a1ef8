"""One relayed stream, from the provider to the client's socket. Everything about a stream's life is here.

Two tasks share a stream (see ARCHITECTURE.md):

* the **provider task** iterates the provider and pushes each batch of events into a small bounded channel;
* the **consumer**, the request's own handler task, takes everything waiting in the channel, encodes it with
  the framing, and writes it as one frame group. It also owns the clocks: first-token, idle and total timeouts,
  heartbeats, the flush window and the write timeout.

When the client leaves (`watch_disconnect`), the provider task is cancelled at once, which closes the upstream
HTTP response, and the consumer returns. When the consumer ends for any other reason, the provider task is
cancelled too: nothing outlives the request. The response is prepared lazily, on the first frame, so that a
failure before any token (upstream down, rate limited) is still an HTTP status with a JSON body.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from aiohttp import web

from .chat_request import ChatRequest
from .disconnect import watch_disconnect
from .errors import RelayError, StreamTimeout
from .events import Delta, Error, Event
from .framing import Framing, encode_sse, json_bytes
from .providers.base import Provider, collect_aborts

log = logging.getLogger("llm_relay.stream")

# What a stream may hold for a slow consumer before its provider task waits (and so stops reading the upstream):
# the memory a client that stopped reading can cost us, on top of the transport's high-water mark.
CHANNEL_CAPACITY = 512  # events
CHANNEL_CAPACITY_CHARS = 16 * 1024  # characters of content
PRODUCER_DRAIN_GRACE = 0.5  # after the end, time for the provider to read the upstream body to its end


@dataclass(frozen=True, slots=True)
class StreamSettings:
    """The clocks of a stream, in seconds; 0 turns one off."""

    first_token_timeout: float = 60.0
    idle_timeout: float = 60.0
    total_timeout: float = 600.0
    write_timeout: float = 10.0
    send_buffer: int = 0
    keepalive_interval: float = 15.0
    flush_window: float = 0.0
    flush_bytes: int = 0
    reconnect_hint_ms: int = 3000


class ServerShuttingDown(RelayError):
    status = 503
    type = "server_shutdown"


class InternalError(RelayError):
    status = 500
    type = "internal_error"


class _Channel:
    """Provider → consumer hand-over: batches in, everything-so-far out, one waiter on each side."""

    __slots__ = (
        "_chars", "_consumer_waiter", "_events", "_producer_waiter", "_timer", "_timer_at", "closed", "failure",
    )  # fmt: skip

    def __init__(self) -> None:
        self._events: deque[Event] = deque()
        self._chars = 0
        self._consumer_waiter: asyncio.Future[None] | None = None
        self._producer_waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.failure: RelayError | None = None
        # One timer per stream, re-armed only when a deadline comes earlier than the armed one: the deadlines
        # mostly move later (each token pushes the idle one), so a timer per wait would be created and cancelled
        # for every token. An early firing just makes the consumer re-check its clocks.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def _wake_consumer(self) -> None:
        waiter = self._consumer_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def put(self, batch: Sequence[Event]) -> None:
        self._events.extend(batch)
        for event in batch:
            if isinstance(event, Delta):
                self._chars += len(event.content)
        self._wake_consumer()
        while (len(self._events) >= CHANNEL_CAPACITY or self._chars >= CHANNEL_CAPACITY_CHARS) and not self.closed:
            self._producer_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._producer_waiter
            finally:
                self._producer_waiter = None

    def close(self, failure: RelayError | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        self.failure = failure
        self._wake_consumer()
        waiter = self._producer_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def take(self) -> list[Event]:
        events = list(self._events)
        self._events.clear()
        self._chars = 0
        waiter = self._producer_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        return events

    @property
    def ready(self) -> bool:
        return bool(self._events) or self.closed

    def _on_timer(self) -> None:
        self._timer = None
        self._wake_consumer()

    def dispose(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def wait(self, deadline: float | None) -> bool:
        """Wait until something is ready or `deadline` (loop time) passes (or a little earlier); True if something
        is ready."""
        if self.ready:
            return True
        loop = asyncio.get_running_loop()
        if deadline is not None and (self._timer is None or self._timer_at > deadline):
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = deadline
            self._timer = loop.call_at(deadline, self._on_timer)
        self._consumer_waiter = loop.create_future()
        try:
            await self._consumer_waiter
        finally:
            self._consumer_waiter = None
        return self.ready


def new_stream_id() -> str:
    # Unique across processes and restarts (a later resume can look it up) and short enough for a header.
    return f"s-{secrets.token_hex(8)}"


def error_response(error: RelayError, extra_headers: dict[str, str] | None = None) -> web.Response:
    """The JSON error response for `error`, the only place HTTP errors are shaped."""
    headers = dict(error.headers)
    if extra_headers:
        headers.update(extra_headers)
    if error.retry_after is not None:
        # RFC 9110 §10.2.3: delay-seconds, a whole number; round up so a client never retries too early.
        headers["Retry-After"] = str(max(0, int(-(-error.retry_after // 1))))
    return web.Response(
        status=error.status,
        body=json_bytes(error.body()),
        content_type="application/json",
        headers=headers,
    )


class RelayStream:
    """A stream's identity (id, event sequence) and life (provider task, consumer, clocks)."""

    # Thousands of these live at once on a busy server; slots keep each one small.
    __slots__ = (
        "_aborts", "_channel", "_client_gone", "_high_water", "_producer", "_response", "_shutdown", "chat",
        "extra_headers", "framing", "id", "keepalive", "outcome", "provider", "seq", "settings",
    )  # fmt: skip

    def __init__(
        self,
        provider: Provider,
        chat: ChatRequest,
        framing: Framing,
        settings: StreamSettings,
        *,
        stream_id: str | None = None,
        headers: dict[str, str] | None = None,
        keepalive: bool = True,
    ) -> None:
        self.id = stream_id or new_stream_id()
        self.seq = 0
        self.provider = provider
        self.chat = chat
        self.framing = framing
        self.settings = settings
        self.extra_headers = headers or {}
        self.keepalive = keepalive and settings.keepalive_interval > 0
        self.outcome = "running"  # done | error | timeout | disconnected | slow_client | shutdown | cancelled
        self._channel = _Channel()
        self._producer: asyncio.Task[None] | None = None
        self._response: web.StreamResponse | None = None
        self._client_gone = False
        self._shutdown = False
        self._high_water = 0
        self._aborts: list[Callable[[], None]] = []

    # -- the provider task ------------------------------------------------------------------------------------

    async def _produce(self) -> None:
        collect_aborts(self._aborts)  # this task's own context: the provider's on_abort() lands here
        failure: RelayError | None = None
        try:
            async with contextlib.aclosing(self.provider.stream(self.chat)) as batches:
                async for batch in batches:
                    await self._channel.put(batch)
        except RelayError as exc:
            failure = exc
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("stream %s: the provider failed", self.id)
            failure = InternalError("the relay failed while generating the reply")
        finally:
            self._channel.close(failure)

    def _stop_producer(self) -> None:
        if self._producer is not None and not self._producer.done():
            self._producer.cancel()

    # -- signals from outside ---------------------------------------------------------------------------------

    def _on_client_lost(self) -> None:
        # Called from the transport's connection_lost: cancel the upstream now, not at the next write.
        self._client_gone = True
        for abort in self._aborts:
            try:
                abort()
            except Exception:  # a failed early close only means the cancellation below does the work
                log.exception("stream %s: the provider's abort callback failed", self.id)
        self._stop_producer()
        self._channel.close()

    def shutdown(self) -> None:
        """End this stream soon with an in-band ``server_shutdown`` error (graceful shutdown)."""
        self._shutdown = True
        self._stop_producer()
        self._channel.close(
            ServerShuttingDown(
                "the server is restarting; try again shortly",
                retry_after=self.settings.reconnect_hint_ms / 1000,
            )
        )

    # -- the consumer -----------------------------------------------------------------------------------------

    async def run(self, request: web.Request) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        with watch_disconnect(
            request,
            self._on_client_lost,
            user_timeout=self.settings.write_timeout,
            send_buffer=self.settings.send_buffer,
        ):
            self._producer = loop.create_task(self._produce(), name=f"llm-relay provider {self.id}")
            try:
                return await self._consume(request, loop)
            except asyncio.CancelledError:
                self.outcome = "cancelled"
                raise
            finally:
                self._channel.dispose()
                await self._finish_producer()

    async def _finish_producer(self) -> None:
        producer = self._producer
        if producer is None:
            return
        if not producer.done() and self.outcome == "done":
            # Let it read the upstream body to its end (the chunk after [DONE]) so the connection is reused.
            await asyncio.wait({producer}, timeout=PRODUCER_DRAIN_GRACE)
        if not producer.done():
            producer.cancel()
            await asyncio.wait({producer})
        if not producer.cancelled() and producer.exception() is not None:  # pragma: no cover - _produce catches
            log.error("stream %s: provider task ended with %r", self.id, producer.exception())

    async def _consume(self, request: web.Request, loop: asyncio.AbstractEventLoop) -> web.StreamResponse:
        settings = self.settings
        started = loop.time()
        last_event_at: float | None = None
        last_write_at = started
        held: list[bytes] = []
        held_size = 0
        held_since = 0.0
        framing = self.framing
        channel = self._channel
        while True:
            now = loop.time()
            deadlines: list[float] = []
            if settings.total_timeout:
                deadlines.append(started + settings.total_timeout)
            if last_event_at is None:
                if settings.first_token_timeout:
                    deadlines.append(started + settings.first_token_timeout)
            elif settings.idle_timeout:
                deadlines.append(last_event_at + settings.idle_timeout)
            if held:
                deadlines.append(held_since + settings.flush_window)
            elif self.keepalive:  # held frames will go out soon anyway; no heartbeat is due then
                deadlines.append(last_write_at + settings.keepalive_interval)
            deadline = min(deadlines) if deadlines else None
            if not channel.ready and (deadline is None or deadline > now):
                await channel.wait(deadline)
                now = loop.time()
            if self._client_gone:
                self.outcome = "disconnected"
                return self._response or web.Response(status=499)

            events = channel.take()
            terminal: Event | None = None
            if events:
                last_event_at = now
                if not held:
                    held_since = now
                for event in events:
                    self.seq += 1
                    frame = framing.encode(self.seq, event)
                    held.append(frame)
                    held_size += len(frame)
                    if not isinstance(event, Delta):
                        terminal = event
                        break
            elif channel.closed:
                failure = channel.failure
                if failure is None:
                    failure = InternalError("the reply ended without finishing")
                if self._response is None and not held:
                    self.outcome = "shutdown" if self._shutdown else "error"
                    return error_response(failure)
                self.seq += 1
                if self._shutdown and self.framing.name == "sse" and isinstance(failure, ServerShuttingDown):
                    # §9.2.6 retry: how long the browser waits before it reconnects to the restarted server.
                    held.append(encode_sse(retry=self.settings.reconnect_hint_ms))
                event = failure.to_event()
                held.append(framing.encode(self.seq, event))
                terminal = event
            else:
                timeout = self._expired(now, started, last_event_at)
                if timeout is not None:
                    self._stop_producer()
                    if self._response is None and not held:
                        self.outcome = "timeout"
                        return error_response(timeout)
                    self.seq += 1
                    terminal = timeout.to_event()
                    held.append(framing.encode(self.seq, terminal))
                elif self.keepalive and now >= last_write_at + settings.keepalive_interval and not held:
                    held.append(framing.keepalive())

            if not held:
                continue
            if (
                terminal is None
                and settings.flush_window
                and (not settings.flush_bytes or held_size < settings.flush_bytes)
                and now < held_since + settings.flush_window
            ):
                continue
            data = held[0] if len(held) == 1 else b"".join(held)
            held.clear()
            held_size = 0
            if not await self._write(request, data, last=terminal is not None):
                return self._response or web.Response(status=499)
            last_write_at = loop.time()
            if terminal is not None:
                self._set_outcome(terminal)
                assert self._response is not None
                return self._response

    def _set_outcome(self, terminal: Event) -> None:
        if isinstance(terminal, Error):
            if terminal.type == StreamTimeout.type:
                self.outcome = "timeout"
            elif terminal.type == ServerShuttingDown.type:
                self.outcome = "shutdown"
            else:
                self.outcome = "error"
        else:
            self.outcome = "done"

    def _expired(self, now: float, started: float, last_event_at: float | None) -> StreamTimeout | None:
        settings = self.settings
        if settings.total_timeout and now >= started + settings.total_timeout:
            return StreamTimeout("the reply took longer than the relay allows")
        if last_event_at is None:
            if settings.first_token_timeout and now >= started + settings.first_token_timeout:
                return StreamTimeout("the model did not start answering in time")
        elif settings.idle_timeout and now >= last_event_at + settings.idle_timeout:
            return StreamTimeout("the model stopped answering mid-reply")
        return None

    async def _prepare(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": self.framing.content_type,
                # RFC 9111 §5.2.2.4: every client and proxy must revalidate; a cached token stream is useless.
                "Cache-Control": "no-cache",
                # nginx buffers proxied responses unless told not to; buffering would hold every token.
                "X-Accel-Buffering": "no",
                "X-Content-Type-Options": "nosniff",
                "X-Stream-Id": self.id,
                **self.extra_headers,
            },
        )
        # No enable_compression(): zlib would hold every token until the end. No forced chunking either, so an
        # HTTP/1.0 client gets a body delimited by the connection's close.
        await response.prepare(request)
        self._response = response
        if request.transport is not None:
            self._high_water = request.transport.get_write_buffer_limits()[1]
        return response

    async def _write(self, request: web.Request, data: bytes, *, last: bool = False) -> bool:
        """Write `data` (with the end of the body when `last`); False if the client is gone or too slow."""
        try:
            response = self._response or await self._prepare(request)
            transport = request.transport
            if (
                not last
                and transport is not None
                and not request.protocol.writing_paused
                and transport.get_write_buffer_size() + len(data) < self._high_water
            ):
                # Not paused, and still below the high-water mark after this write: the protocol cannot pause,
                # so the write cannot wait on drain and needs no timer on the hot path. (Once paused, it stays
                # paused down to the low-water mark, hence the explicit check.)
                await response.write(data)
            elif self.settings.write_timeout:
                # write_eof() always drains, so the last write runs under the timer too.
                async with asyncio.timeout(self.settings.write_timeout):
                    await (response.write_eof(data) if last else response.write(data))
            else:
                await (response.write_eof(data) if last else response.write(data))
        except TimeoutError:
            # The client stopped reading: drop it rather than hold a growing buffer for it.
            self.outcome = "slow_client"
            self._stop_producer()
            if request.transport is not None:
                request.transport.abort()
            log.info("stream %s: client stopped reading; dropped after %.1fs", self.id, self.settings.write_timeout)
            return False
        except ConnectionError:
            self.outcome = "disconnected"
            self._client_gone = True
            self._stop_producer()
            return False
        if self._client_gone:
            self.outcome = "disconnected"
            return False
        return True
