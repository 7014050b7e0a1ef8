"""One relayed stream, from the provider to the client's socket. Everything about a stream's life is here.

One task does the work: the handler's own task iterates the provider, encodes each batch of events with the
framing and writes it as one frame group (see ARCHITECTURE.md). No queue sits between the upstream and the
client, so a client that stops reading stops the upstream read too (the provider is not asked for more while a
write waits), and each token costs one task step, as in the plainest handler.

Everything that must happen while the task waits on the provider comes from one timer per stream, re-armed only
when a deadline comes earlier than the armed one: a first-token, idle or total timeout cancels the task (which
closes the upstream) and ends the stream in band; a heartbeat or the end of a flush window is written by a short
side task. When the client leaves (`watch_disconnect`), the provider's abort callbacks close the upstream socket
at once and the task is cancelled, whatever the host runner's ``handler_cancellation`` setting. The stream takes
each cancellation of its own back (`Task.uncancel`) before the handler returns, so the host's task comes back
clean; one of the host's goes on. The response is prepared lazily, with the first frame, so that a failure before
any token (upstream down, rate limited) is still an HTTP status with a JSON body.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass

from aiohttp import hdrs, web
from aiohttp.http import StreamWriter

from .chat_request import ChatRequest
from .disconnect import watch_disconnect
from .errors import RelayError, StreamTimeout
from .events import Delta, Error, Event
from .framing import Framing, encode_sse, json_bytes
from .providers.base import Provider, collect_aborts, stop_collecting_aborts

log = logging.getLogger("llm_relay.stream")

# After the last frame, how long the provider may go on reading the upstream body to its end (the bytes after
# [DONE]), so that the upstream connection can go back to its pool instead of being closed.
PROVIDER_DRAIN_GRACE = 0.5
# What aiohttp's chunked encoding adds to a write: its size line (at most 16 hex digits) and CRLFs, and after the
# last one the zero-size chunk that ends the body.
_FRAMING_BYTES = 16 + 4 + len(b"0\r\n\r\n")

# Why the stream cancelled its task itself (see RelayStream._stop).
_GONE, _TIMEOUT, _SHUTDOWN = "gone", "timeout", "shutdown"


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
    """A stream's identity (id, event sequence) and life (the provider loop, its clocks, its writes)."""

    # Thousands of these live at once on a busy server; slots keep each one small.
    __slots__ = (
        "_aborts", "_base_cancels", "_cancellable", "_chunked", "_client_gone", "_clock_blocked", "_direct", "_held",
        "_held_since", "_held_size", "_high_water", "_last_event_at", "_last_write_at", "_loop", "_owed", "_request",
        "_response", "_side_write", "_started", "_stop_error", "_stop_reason", "_task", "_timer", "_timer_at",
        "_writing", "chat", "extra_headers", "framing", "id", "keepalive", "outcome", "provider", "seq", "settings",
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
        self._aborts: list[Callable[[], None]] = []
        self._task: asyncio.Task[object] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._request: web.Request | None = None
        self._response: web.StreamResponse | None = None
        self._high_water = 0
        # Set at prepare(): whether the token path may write its frames to the transport itself, and as chunks.
        self._direct = False
        self._chunked = False
        # True while the task is relaying and may be cancelled by the stream's own signals (_stop).
        self._cancellable = False
        # The host's task may come in with cancellations already counted: ours are those above that count.
        self._base_cancels = 0
        # True from a stop's cancel() until it is taken back (Task.uncancel), which every way out of the stream does.
        self._owed = False
        self._stop_reason: str | None = None
        self._stop_error: RelayError | None = None
        self._client_gone = False
        # Frames encoded but not yet written (a flush window holds them; otherwise they go out at once).
        self._held: list[bytes] = []
        self._held_size = 0
        self._held_since = 0.0
        self._writing = False
        self._side_write: asyncio.Task[None] | None = None
        self._started = 0.0
        self._last_event_at: float | None = None
        self._last_write_at = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._clock_blocked = False

    # -- signals from outside ---------------------------------------------------------------------------------

    def _stop(self, reason: str, error: RelayError | None = None) -> None:
        """Cancel the relaying task (once) for `reason`; cancellation closes the provider and so the upstream."""
        if not self._cancellable or self._task is None:
            return
        self._cancellable = False
        self._stop_reason = reason
        self._stop_error = error
        self._cancel_owed()

    def _cancel_owed(self) -> None:
        """Cancel the task for a reason of the stream's own: a cancellation owed back (`_take_back`)."""
        assert self._task is not None
        self._owed = True
        self._task.cancel()

    def _take_back(self) -> bool:
        """Take back the stop's cancellation (once); True if one of the host's is still counted."""
        assert self._task is not None
        self._owed = False
        return self._task.uncancel() > self._base_cancels

    def _on_client_lost(self) -> None:
        # Called from the transport's connection_lost: close the upstream now, not at the next write.
        self._client_gone = True
        for abort in self._aborts:
            try:
                abort()
            except Exception:  # a failed early close only means the cancellation below does the work
                log.exception("stream %s: the provider's abort callback failed", self.id)
        self._stop(_GONE)

    def shutdown(self) -> None:
        """End this stream soon with an in-band ``server_shutdown`` error (graceful shutdown)."""
        self._stop(
            _SHUTDOWN,
            ServerShuttingDown(
                "the server is restarting; try again shortly",
                retry_after=self.settings.reconnect_hint_ms / 1000,
            ),
        )

    # -- the clocks -------------------------------------------------------------------------------------------

    def _next_deadline(self) -> float | None:
        """The nearest deadline that applies now.

        While the task writes, the provider is not being asked for anything, so the first-token and idle clocks
        do not run (the write timeout guards the write); while any write is in progress, held frames and
        heartbeats wait for its end, which re-arms the clock.
        """
        settings = self.settings
        deadline: float | None = None
        if settings.total_timeout:
            deadline = self._started + settings.total_timeout
        if self._writing:
            return deadline
        if self._last_event_at is None:
            if settings.first_token_timeout:
                due = self._started + settings.first_token_timeout
                deadline = due if deadline is None or due < deadline else deadline
        elif settings.idle_timeout:
            due = self._last_event_at + settings.idle_timeout
            deadline = due if deadline is None or due < deadline else deadline
        if self._side_write is not None:
            return deadline
        if self._held:
            due = self._held_since + settings.flush_window
            deadline = due if deadline is None or due < deadline else deadline
        elif self.keepalive:  # held frames go out soon anyway; no heartbeat is due then
            due = self._last_write_at + settings.keepalive_interval
            deadline = due if deadline is None or due < deadline else deadline
        return deadline

    def _arm(self) -> None:
        """Make sure the timer fires no later than the nearest deadline.

        Deadlines mostly move later (each token pushes the idle one and each write the heartbeat), so the timer is
        replaced only when a deadline comes earlier than the armed one; a timer that fires early just re-arms.
        """
        deadline = self._next_deadline()
        if deadline is None or self._loop is None:
            return
        if self._timer is not None:
            if self._timer_at <= deadline:
                return
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self._loop.call_at(deadline, self._on_clock)

    def _on_clock(self) -> None:
        self._timer = None
        if not self._cancellable or self._loop is None or self._request is None:
            return
        now = self._loop.time()
        timeout = self._expired(now)
        if timeout is not None:
            self._stop(_TIMEOUT, timeout)
            return
        if self._writing or self._side_write is not None:
            # A write is in progress: held frames and heartbeats wait for its end, which re-arms the clock
            # (_next_deadline leaves them out meanwhile, or the timer would fire again at once until then).
            self._clock_blocked = True
        elif self._held and now >= self._held_since + self.settings.flush_window:
            self._write_aside(self._take_held())
        elif not self._held and self.keepalive and now >= self._last_write_at + self.settings.keepalive_interval:
            self._write_aside(self.framing.keepalive())
        self._arm()

    def _expired(self, now: float) -> StreamTimeout | None:
        settings = self.settings
        if settings.total_timeout and now >= self._started + settings.total_timeout:
            return StreamTimeout("the reply took longer than the relay allows")
        if self._writing:  # not waiting on the provider: its clocks do not run (see _next_deadline)
            return None
        if self._last_event_at is None:
            if settings.first_token_timeout and now >= self._started + settings.first_token_timeout:
                return StreamTimeout("the model did not start answering in time")
        elif settings.idle_timeout and now >= self._last_event_at + settings.idle_timeout:
            return StreamTimeout("the model stopped answering mid-reply")
        return None

    # -- the relaying task ------------------------------------------------------------------------------------

    async def run(self, request: web.Request) -> web.StreamResponse:
        """Relay the stream to `request`'s client; returns the response (or a JSON error response).

        The stream runs in the handler's own task: a task of its own would first wait its turn in the event loop's
        queue, before the upstream request even starts (20-50 ms of the time to first token with 500 relayed
        streams on a busy loop). The stream's signals (timeouts, disconnect, shutdown) cancel this task and take
        their cancellation back (`Task.uncancel`) before it leaves the stream, so the host never sees one; a
        cancellation of the host's own (its handler_cancellation, a host timeout) goes on once the stream has
        unwound (upstream closed).
        """
        loop = self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        assert self._task is not None
        self._base_cancels = self._task.cancelling()
        self._request = request
        with watch_disconnect(
            request,
            self._on_client_lost,
            user_timeout=self.settings.write_timeout,
            send_buffer=self.settings.send_buffer,
        ):
            # The provider runs in this task: its on_abort() callbacks land in this stream's list.
            collecting = collect_aborts(self._aborts)
            try:
                return await self._relay(request, loop)
            finally:
                try:
                    self._cancellable = False
                    if self._timer is not None:
                        self._timer.cancel()
                        self._timer = None
                    side = self._side_write
                    if side is not None:
                        side.cancel()
                        await asyncio.wait({side})
                finally:
                    stop_collecting_aborts(collecting)

    async def _relay(self, request: web.Request, loop: asyncio.AbstractEventLoop) -> web.StreamResponse:
        self._started = self._last_write_at = loop.time()
        if self._client_gone:  # left before the stream began
            self.outcome = "disconnected"
            return web.Response(status=499)
        self._cancellable = True
        self._arm()
        failure: RelayError
        try:
            try:
                async with contextlib.aclosing(self.provider.stream(self.chat)) as batches:
                    async for batch in batches:
                        if await self._deliver(request, loop, batch) or self._client_gone:
                            # From here on the stream's signals must not cancel the provider's own cleanup
                            # (closing the upstream response), which `aclosing` awaits on the way out.
                            self._cancellable = False
                            if self._owed and self._take_back():  # the provider absorbed a stop
                                raise asyncio.CancelledError
                            if self.outcome == "done":
                                await self._read_to_end(batches)
                            return self._response or web.Response(status=499)
                failure = InternalError("the reply ended without finishing")
            except RelayError as exc:
                failure = exc
        except asyncio.CancelledError:
            self._cancellable = False
            if not self._owed or self._take_back():
                # Not ours (nothing owed: the host's handler cancellation, the server going down), or the host's
                # as well as ours: let it go on.
                self.outcome = "disconnected" if self._client_gone else "cancelled"
                raise
            return await self._stopped(request)
        except Exception:
            if self._stop_reason is None:
                log.exception("stream %s: the provider failed", self.id)
            failure = InternalError("the relay failed while generating the reply")
        self._cancellable = False
        if self._owed:
            # The stream had stopped itself, and the provider turned that cancellation into an error of its own:
            # the stop's reason (client gone, timeout, shutdown) is what ends the stream.
            if self._take_back():
                raise asyncio.CancelledError
            return await self._stopped(request)
        return await self._fail(request, failure)

    async def _stopped(self, request: web.Request) -> web.StreamResponse:
        """End a stream that stopped itself (`_stop`): nothing more if the client left, else the stop's error."""
        if self._stop_reason == _GONE:
            if self.outcome == "running":
                self.outcome = "disconnected"
            return self._response or web.Response(status=499)
        assert self._stop_error is not None
        return await self._fail(request, self._stop_error)

    async def _deliver(self, request: web.Request, loop: asyncio.AbstractEventLoop, batch: Sequence[Event]) -> bool:
        """Encode and write (or hold) `batch`; True when the stream has ended (terminal event or lost client)."""
        if not batch:  # nothing arrived: not a first token, and nothing to send
            return False
        now = loop.time()
        first = self._last_event_at is None
        self._last_event_at = now
        held = self._held
        if not held:
            self._held_since = now
        framing = self.framing
        terminal: Event | None = None
        for event in batch:
            self.seq += 1
            frame = framing.encode(self.seq, event)
            held.append(frame)
            self._held_size += len(frame)
            if not isinstance(event, Delta):
                terminal = event
                break
        if terminal is not None:
            self._cancellable = False
            if await self._flush(request, last=True):
                self._set_outcome(terminal)
            return True
        settings = self.settings
        if (
            settings.flush_window
            and (not settings.flush_bytes or self._held_size < settings.flush_bytes)
            and now < self._held_since + settings.flush_window
        ):
            self._arm()  # the window's end may be the nearest deadline now
            return False
        if first:
            self._arm()  # the idle deadline replaces the first-token one and may be earlier
        if self._direct and self._side_write is None and self._fits(request, self._held_size):
            # The path of nearly every token: the write cannot wait (see _fits), so none of _flush's bookkeeping
            # for writes that can is needed, and no timer either. The frames go to the transport as one HTTP/1.1
            # chunk (RFC 9112 §7.1), framed here: aiohttp's write() would do exactly that, through two coroutines
            # and a join per token (~0.7 CPU-µs per frame, a twentieth of a core at 1,000 paced streams). Only
            # where aiohttp would do nothing more (see _prepare); its byte count, which access logs report, is kept.
            transport = request.transport
            if transport is None or transport.is_closing():
                return not self._lost()
            data = self._take_held()
            if self._chunked:
                data = b"%x\r\n%b\r\n" % (len(data), data)
            # The writer's count is what access logs report. (Its buffer_size only paces aiohttp's own drain()
            # calls, every 64 KiB it writes; this path never needs one, see _fits.)
            request.writer.output_size += len(data)
            transport.write(data)
            if self.keepalive:
                self._last_write_at = now
            return False
        return not await self._flush(request)

    async def _read_to_end(self, batches: AsyncGenerator[Sequence[Event], None]) -> None:
        """After the last frame, let the provider read the upstream body to its end so its connection is reused.

        At most PROVIDER_DRAIN_GRACE: then the task is cancelled, as asyncio.timeout() would do, by a plain timer
        (asyncio.timeout cost a tenth of a short stream's CPU: its object, and a task and a loop lookup). The
        cancellation is owed back like a stop's; the stream's signals no longer cancel by now (`_cancellable`).
        """
        assert self._loop is not None
        timer = self._loop.call_at(self._loop.time() + PROVIDER_DRAIN_GRACE, self._cancel_owed)
        try:
            async for _ in batches:
                pass
        except asyncio.CancelledError:
            if not self._owed:  # the host's cancellation: it goes on
                raise
        except Exception:  # the client has its whole reply: whatever the upstream does now changes nothing for it
            log.debug("stream %s: the upstream failed after the end of the reply", self.id, exc_info=True)
        finally:
            timer.cancel()
        if self._owed:
            # Take back our cancellation however the provider ended (it may have turned it into an error, or
            # swallowed it); one from the host as well goes on.
            log.debug("stream %s: the upstream had not ended %.1fs after the reply", self.id, PROVIDER_DRAIN_GRACE)
            if self._take_back():
                raise asyncio.CancelledError

    async def _fail(self, request: web.Request, failure: RelayError) -> web.StreamResponse:
        """End the stream with `failure`: a JSON error response if nothing was sent yet, else in band."""
        shutdown = isinstance(failure, ServerShuttingDown)
        if self._response is None and not self._held and self._side_write is None:
            self._set_outcome(failure.to_event())
            return error_response(failure)
        self.seq += 1
        if shutdown and self.framing.name == "sse":
            # §9.2.6 retry: how long the browser waits before it reconnects to the restarted server.
            self._held.append(encode_sse(retry=self.settings.reconnect_hint_ms))
        event = failure.to_event()
        self._held.append(self.framing.encode(self.seq, event))
        if await self._flush(request, last=True):
            self._set_outcome(event)
        return self._response or web.Response(status=499)

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

    # -- writing ----------------------------------------------------------------------------------------------

    def _now(self) -> float:
        # The loop's clock without asyncio.get_running_loop(), which on this Python makes a getpid() system call
        # each time (seen with strace): this runs for every written frame when heartbeats are on.
        assert self._loop is not None
        return self._loop.time()

    def _take_held(self) -> bytes:
        held = self._held
        data = held[0] if len(held) == 1 else b"".join(held)
        held.clear()
        self._held_size = 0
        return data

    async def _flush(self, request: web.Request, *, last: bool = False) -> bool:
        """Write the held frames (and end the body when `last`); False if the client is gone or too slow."""
        # While this runs the timer writes nothing itself (held frames are ours) and the provider's clocks stop.
        self._writing = True
        try:
            if not await self._flush_held(request, last):
                return False
        finally:
            self._writing = False
        if self._clock_blocked:
            self._clock_blocked = False
            self._arm()
        return True

    async def _flush_held(self, request: web.Request, last: bool) -> bool:
        side = self._side_write
        if side is not None:  # a heartbeat or a flush window's end is being written: frames stay in order
            await asyncio.wait({side})
        if self._client_gone:
            return False
        data = self._take_held()
        response = self._response
        if response is None:
            try:  # prepare() only buffers the head, which travels with the first frame
                response = await self._prepare(request)
            except ConnectionError:
                return self._lost()
        if self._fits(request, len(data)):
            if not await self._write(request, data, last=last, can_wait=False):
                return False
            if self.keepalive:
                self._last_write_at = self._now()
            return True
        if not await self._write(request, data, last=last):
            return False
        # The write may have waited for the client: the idle clock restarts now that the provider is asked again.
        now = self._now()
        self._last_write_at = now
        if self._last_event_at is not None:
            self._last_event_at = now
        return True

    def _fits(self, request: web.Request, size: int) -> bool:
        """True when writing `size` more bytes (and then the end of the body) cannot wait for the client.

        Not paused, and still below the high-water mark after the write with the chunked encoding's own bytes: the
        protocol cannot pause, so neither the write nor the drain of write_eof() can wait, and no timer is needed.
        (Once paused, it stays paused down to the low-water mark, hence the explicit check.)
        """
        transport = request.transport
        return (
            transport is not None
            and not request.protocol.writing_paused
            and transport.get_write_buffer_size() + size + _FRAMING_BYTES < self._high_water
        )

    def _lost(self) -> bool:
        self.outcome = "disconnected"
        self._client_gone = True
        return False

    def _write_aside(self, data: bytes) -> None:
        """Write `data` from a short side task while the relaying task waits on the provider (timer writes)."""
        assert self._loop is not None
        assert self._request is not None
        self._side_write = self._loop.create_task(self._side(self._request, data))

    async def _side(self, request: web.Request, data: bytes) -> None:
        try:
            ok = await self._write(request, data)
        except Exception:  # not a lost or slow client (those are False): end the stream rather than hang it
            log.exception("stream %s: a heartbeat or held frames could not be written", self.id)
            ok = False
        finally:
            self._side_write = None
        if ok:
            self._last_write_at = self._now()
            self._clock_blocked = False
            self._arm()
        else:
            self._stop(_GONE)

    async def _prepare(self, request: web.Request) -> web.StreamResponse:
        response = _StreamResponse(
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
        # The token path frames chunks itself only where aiohttp's writer would add nothing but the chunk's frame:
        # aiohttp's own writer, no compression, no Content-Length, a body at all (not HEAD). None of them can
        # happen to this response today (on_response_prepare hooks run once aiohttp has settled how the body is
        # framed); checked once, so that it stays so. Chunked or not is what the writer does, as it frames the
        # heartbeats and the end of the body the same way.
        writer = request.writer
        if isinstance(writer, StreamWriter):
            self._direct = not response.compression and writer.length is None and request.method != hdrs.METH_HEAD
            self._chunked = writer.chunked
        return response

    async def _write(self, request: web.Request, data: bytes, *, last: bool = False, can_wait: bool = True) -> bool:
        """Write `data` (with the end of the body when `last`), preparing the response first if needed; False if
        the client is gone or too slow. A write that `can_wait` runs under the write timeout; one that cannot
        (`_fits` said so) needs no timer."""
        try:
            response = self._response or await self._prepare(request)
            if can_wait and self.settings.write_timeout:
                async with asyncio.timeout(self.settings.write_timeout):
                    await (response.write_eof(data) if last else response.write(data))
            else:
                await (response.write_eof(data) if last else response.write(data))
        except TimeoutError:
            # The client stopped reading: drop it rather than hold a growing buffer for it.
            self.outcome = "slow_client"
            self._client_gone = True
            if request.transport is not None:
                request.transport.abort()
            log.info("stream %s: client stopped reading; dropped after %.1fs", self.id, self.settings.write_timeout)
            return False
        except ConnectionError:
            return self._lost()
        if self._client_gone:
            return self._lost()
        return True


class _StreamResponse(web.StreamResponse):
    # aiohttp sends a StreamResponse's head in its own packet at prepare(); we prepare only with the first frame,
    # so let the head travel with it (one send instead of two per stream).
    _send_headers_immediately = False
