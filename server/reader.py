"""A reader: one client connection following one generation, through `StreamResponse.write` only.

    generation.log ──since(pos)──▶ framing.encode ──▶ response.write (under the write timeout) ──▶ client
         ▲ add_waiter: woken by the next append, the heartbeat timer, the client leaving, or shutdown

It replays the log from `after`, then follows it live; each wake-up writes everything new in one write. A
reader never slows its generation or the other readers: a client that stops reading is dropped when a write
waits longer than the write timeout (it can resume). When the client's connection closes (`watch_disconnect`,
whatever the host's ``handler_cancellation``), the reader leaves its generation in the same loop turn, so the
registry can cancel the generation, and the upstream, at once.

The response is prepared lazily, with the first frame, so that a generation failing before any event (upstream
down, rate limited) still answers with an HTTP status and a JSON body; a resumable stream is prepared at once
instead, so the client learns the stream's id before the first token (and can resume a cut before it).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from operator import methodcaller

from aiohttp import hdrs, web

from .compression import IDENTITY, StreamCompressor, choose_coding, may_compress
from .disconnect import watch_disconnect
from .errors import RelayError, ResumeUnavailable
from .events import Error, Event, is_terminal
from .framing import Framing
from .generation import Generation, ServerShuttingDown
from .negotiation import field_value
from .observe import StreamObserver
from .registry import StreamRegistry
from .responses import error_response

log = logging.getLogger("llm_relay.reader")


@dataclass(frozen=True, slots=True)
class ReaderSettings:
    """A reader's clocks, in seconds (0 turns one off), and its connection's settings."""

    write_timeout: float = 10.0
    send_buffer: int = 0
    keepalive_interval: float = 15.0
    flush_window: float = 0.0
    flush_bytes: int = 0
    reconnect_hint_ms: int = 3000
    # Content codings offered to clients, in order of preference (server/compression.py); () = never compress.
    compression: tuple[str, ...] = ()


class _SlotTimers:
    """Timers of one event loop shared by its readers: the readers due in the same slot (an eighth of their
    interval, in whole milliseconds) are called by one timer, up to an eighth of the interval late, never early.

    Heartbeats: a timer per reader (its handle, the loop's own timer, a context copy, a bound method) was ~0.4 KiB
    per open stream, most of what an idle stream costs beside its connection; a keep-alive's job (staying inside a
    proxy's idle timeout, detecting a dead peer) does not need it on the dot. A slot's timer is cancelled when its
    last reader leaves it.

    Write deadlines: every write is under the write timeout, and a timer of its own per write (``asyncio.timeout``:
    an object, the current task, the loop's timer heap, twice) was an eighth of the relay's instructions per token
    on the paced relay (callgrind). A write adds its reader to its slot and takes it out when it returns; the slot's
    timer, armed by the slot's first write, stays armed when the slot empties (`keep_armed`), so the writes of a slot
    share one timer instead of arming and cancelling one each. It fires once, calling the readers still writing.
    """

    __slots__ = ("_call", "_keep_armed", "_readers", "_timers")

    def __init__(self, call: Callable[[Reader], None], *, keep_armed: bool = False) -> None:
        self._call = call
        self._keep_armed = keep_armed
        # By the slot's end in whole milliseconds of loop time.
        self._readers: dict[int, set[Reader]] = {}
        self._timers: dict[int, asyncio.TimerHandle] = {}

    def add(self, reader: Reader, due: float, interval: float) -> int:
        """Call `reader` at the end of the slot `due` falls in; returns that slot, for `discard`."""
        width = max(1, int(interval * 1000 / 8))
        slot = math.ceil(due * 1000 / width) * width
        readers = self._readers.get(slot)
        if readers is None:
            readers = self._readers[slot] = set()
            timer = reader._loop.call_at(slot / 1000, self._fire, slot)
            # A timer kept armed is never cancelled, so its handle is not kept: it refers to its loop, and a loop
            # closed before the timer fires would stay alive through it (see `_LOOP_TIMERS`).
            if not self._keep_armed:
                self._timers[slot] = timer
        readers.add(reader)
        return slot

    def discard(self, reader: Reader, slot: int) -> None:
        readers = self._readers.get(slot)
        if readers is None:
            return
        readers.discard(reader)
        if not readers and not self._keep_armed:
            del self._readers[slot]
            self._timers.pop(slot).cancel()

    def _fire(self, slot: int) -> None:
        self._timers.pop(slot, None)
        call = self._call
        for reader in self._readers.pop(slot):
            try:
                call(reader)
            except Exception:  # one reader's failure must not leave the others of its slot uncalled
                log.exception("a reader's shared timer failed")


class _LoopTimers:
    """The shared timers of one event loop."""

    __slots__ = ("heartbeats", "write_deadlines")

    def __init__(self) -> None:
        self.heartbeats = _SlotTimers(methodcaller("_on_heartbeat"))
        self.write_deadlines = _SlotTimers(methodcaller("_on_write_deadline"), keep_armed=True)


# One per event loop (a reader's loop is the one it runs on); weak, so that a closed loop is not kept alive once
# no reader on it is armed (an armed timer refers to its loop). A loop closed while readers were still armed (a
# test's loop, an embedding app's, closed with streams open) refers to itself through them: such entries go when
# the next loop's timers are made.
_LOOP_TIMERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopTimers] = weakref.WeakKeyDictionary()


def _loop_timers(loop: asyncio.AbstractEventLoop) -> _LoopTimers:
    timers = _LOOP_TIMERS.get(loop)
    if timers is None:
        for closed in [other for other in _LOOP_TIMERS if other.is_closed()]:
            del _LOOP_TIMERS[closed]
        timers = _LOOP_TIMERS[loop] = _LoopTimers()
    return timers


class Reader:
    """Relay `generation` to `request`'s client from after event `after`; `run()` returns the response."""

    __slots__ = (
        "_after", "_announce", "_attached", "_compressor", "_gone", "_headers", "_heartbeat", "_heartbeat_due",
        "_keepalive", "_last_write", "_loop", "_prepare_now", "_registry", "_request", "_respond", "_response",
        "_shutdown", "_timers", "_waiter", "after", "bytes_written", "framing", "generation", "outcome", "position",
        "settings",
    )  # fmt: skip

    def __init__(
        self,
        request: web.Request,
        generation: Generation,
        registry: StreamRegistry,
        framing: Framing,
        settings: ReaderSettings,
        *,
        after: int = 0,
        prepare_now: bool = False,
        announce: bool = False,
        keepalive: bool = True,
        headers: dict[str, str] | None = None,
        respond: Callable[[RelayError, dict[str, str] | None], web.Response] = error_response,
    ) -> None:
        self.generation = generation
        self.framing = framing
        self.settings = settings
        self.outcome = "reading"  # done | error | disconnected | slow_client | shutdown | behind
        # For logs and metrics (server/observe.py): where this reader started, the last event it wrote, and the
        # bytes it wrote (counted per write, read once at the end).
        self.after = after
        self.position = after
        self.bytes_written = 0
        self._request = request
        self._registry = registry
        self._after = after
        self._prepare_now = prepare_now or announce
        self._announce = announce
        self._keepalive = keepalive and settings.keepalive_interval > 0
        self._headers = headers or None  # (an empty dict per open stream is 64 bytes for nothing)
        # How a failure is answered while nothing was written yet: an endpoint may speak another error dialect.
        self._respond = respond
        self._response: web.StreamResponse | None = None
        self._compressor: StreamCompressor | None = None
        self._loop = asyncio.get_running_loop()
        self._timers = _loop_timers(self._loop)  # (looked up once: a weak dictionary's lookup makes a weak reference)
        self._waiter: asyncio.Future[None] | None = None
        self._heartbeat: int | None = None  # its slot in the heartbeats' `_SlotTimers` while armed
        self._heartbeat_due = False
        self._last_write = 0.0
        self._attached = False
        self._gone = False
        self._shutdown = False

    # -- signals from outside (all synchronous, from the event loop) ------------------------------------------

    def _on_lost(self) -> None:
        """The client's connection closed: leave the generation now (the registry may cancel it), then wake."""
        self._gone = True
        self._leave()
        self._wake()

    def shutdown(self) -> None:
        """End this reader soon with an in-band ``server_shutdown`` error and a jittered reconnection hint."""
        self._shutdown = True
        self._wake()

    def _on_heartbeat(self) -> None:
        self._heartbeat = None
        interval = self.settings.keepalive_interval
        due = self._last_write + interval
        if self._loop.time() < due:  # something was written meanwhile: look again when the next one is due
            self._heartbeat = self._timers.heartbeats.add(self, due, interval)
            return
        self._heartbeat_due = True
        self._wake()

    def _on_write_deadline(self) -> None:
        """A write has waited longer than the write timeout: the client stopped reading. Its connection is aborted
        (which ends the write's wait), the reader leaves the generation; the client may resume."""
        self.outcome = "slow_client"
        self._gone = True
        # The connection first: leaving may cancel the generation and tell its observers, and whatever happens
        # there, the write must end.
        transport = self._request.transport
        if transport is not None:
            transport.abort()
        self._leave()
        log.info(
            "stream %s: a client stopped reading; dropped after %.1fs", self.generation.id, self.settings.write_timeout
        )

    def _arm_heartbeat(self) -> None:
        """The heartbeat timer fires once per interval at most; writes only move `_last_write` (see _on_heartbeat)."""
        if self._keepalive and self._heartbeat is None:
            self._heartbeat_due = False
            interval = self.settings.keepalive_interval
            self._heartbeat = self._timers.heartbeats.add(self, self._last_write + interval, interval)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _leave(self) -> None:
        if self._attached:
            self._attached = False
            self._registry.detach(self.generation, self)

    # -- the reading loop -------------------------------------------------------------------------------------

    async def run(self, observer: StreamObserver | None = None, *, resumed: bool = False) -> web.StreamResponse:
        """Replay, then follow, until the end, the client leaving, or shutdown; returns the response. `observer`
        is told when this reader starts and ends (`resumed`: it joined an existing generation).

        One coroutine for the whole reading loop, its wait included: it stays suspended for as long as the stream
        is open, and each nested coroutine would be one more suspended frame (a few hundred bytes) per open stream.
        """
        generation = self.generation
        settings = self.settings
        if observer is not None:
            observer.reader_started(self, resumed)
        try:
            self._registry.attach(generation, self)
            self._attached = True
            # This reader holds everything up to `after`: a generation waiting for a reader to catch up may go on.
            generation.delivered(self._after)
            self._last_write = self._loop.time()
            with watch_disconnect(
                self._request, self._on_lost, user_timeout=settings.write_timeout, send_buffer=settings.send_buffer
            ):
                self._arm_heartbeat()
                if self._prepare_now and not self._gone:
                    opening = self.framing.opening(generation.id, settings.reconnect_hint_ms) if self._announce else b""
                    if not await self._write(opening):
                        return self._response or web.Response(status=499)
                stream_id = generation.id
                framing = self.framing  # (not its bound encode: a method object per open stream)
                pos = self._after
                # Frames encoded but not written yet: a flush window holds them until it ends or flush_bytes is reached.
                held: list[bytes] = []
                held_size = 0
                held_since = 0.0
                while True:
                    if self._gone:
                        self.outcome = "disconnected"
                        return self._response or web.Response(status=499)
                    try:
                        events = generation.log.since(pos)
                    except LookupError:
                        # Fell behind what the log retains (a reader far slower than the generation): it cannot go on
                        # without a gap, and a gap is never silent.
                        self.outcome = "behind"
                        return await self._fail(ResumeUnavailable("this reader fell behind what the relay keeps"), pos)
                    terminal: Event | None = None
                    if events:
                        if self._response is None and not held and pos == 0 and isinstance(events[0], Error):
                            # The generation failed before anything was sent: a status and a JSON body.
                            self.outcome = "error"
                            return self._respond(generation.failure or RelayError(events[0].message), self._headers)
                        if not held:
                            held_since = self._loop.time()
                        for event in events:
                            pos += 1
                            frame = framing.encode(stream_id, pos, event)
                            held.append(frame)
                            held_size += len(frame)
                            if is_terminal(event):
                                terminal = event
                                break
                    window_end = held_since + settings.flush_window
                    if held and (
                        terminal is not None
                        or not settings.flush_window
                        or (settings.flush_bytes and held_size >= settings.flush_bytes)
                        or self._loop.time() >= window_end
                        or self._shutdown
                    ):
                        data = held[0] if len(held) == 1 else b"".join(held)
                        held.clear()
                        held_size = 0
                        if not data and self._response is None and not self._gone:
                            # A framing that writes nothing until the end (a whole JSON reply) gave nothing yet: the
                            # response stays unprepared, so a failure can still be answered with a status.
                            if isinstance(terminal, Error):
                                self.outcome = "error"
                                return self._respond(generation.failure or RelayError(terminal.message), self._headers)
                            if terminal is None:
                                generation.delivered(pos)
                                continue
                        if not await self._write(data, last=terminal is not None):
                            return self._response or web.Response(status=499)
                        generation.delivered(pos)
                        self.position = pos
                        if terminal is not None:
                            self.outcome = "done" if not isinstance(terminal, Error) else "error"
                            return self._response or web.Response(status=499)
                        continue
                    if events:
                        continue  # more may have arrived meanwhile: take them before waiting
                    if generation.ended and not held:
                        # Nothing after `pos` will ever come (the handlers answer such a resume with 204 before it gets
                        # here); waiting would return at once, again and again, without yielding to the loop.
                        return await self._end_body(self._response) if self._response else web.Response(status=204)
                    if self._shutdown:
                        self.outcome = "shutdown"
                        return await self._fail(ServerShuttingDown("the server is restarting; try again shortly"), pos)
                    if self._heartbeat_due and not held:  # held frames go out soon: no heartbeat is needed then
                        if not await self._write(self.framing.keepalive()):  # (the write re-arms the heartbeat)
                            return self._response or web.Response(status=499)
                        continue
                    # Until the generation appends or ends, a signal wakes this reader, or the flush window ends.
                    # (Inline: a coroutine of its own would be one more suspended frame per open stream.)
                    waiter = self._waiter = self._loop.create_future()
                    generation.add_waiter(waiter)
                    timer = self._loop.call_at(window_end, self._wake) if held else None
                    try:
                        await waiter
                    finally:
                        self._waiter = None
                        if timer is not None:
                            timer.cancel()
        finally:
            if self._heartbeat is not None:
                self._timers.heartbeats.discard(self, self._heartbeat)
                self._heartbeat = None
            self._leave()
            if observer is not None:
                observer.reader_ended(self, resumed)
            log.debug("stream %s: a %s reader ended (%s)", generation.id, self.framing.name, self.outcome)

    async def _end_body(self, response: web.StreamResponse) -> web.StreamResponse:
        """A compressed body ends with the end of its compressed stream, which aiohttp's own final write_eof()
        (for a response returned without one) would not write."""
        compressor = self._compressor
        if compressor is not None and not compressor.finished and response is self._response and not self._gone:
            await self._write(b"", last=True)
        return response

    async def _fail(self, error: RelayError, pos: int) -> web.StreamResponse:
        """End this reader with `error`: a JSON error response if nothing was sent yet, else in band."""
        if self._response is None:
            return self._respond(error, self._headers)
        data = self.framing.encode(self.generation.id, pos, error.to_event())
        if isinstance(error, ServerShuttingDown):
            # WHATWG HTML §9.2.6 retry: how long the browser waits before it reconnects. Jittered per stream, so
            # that the browsers of a restarting server do not all come back in the same instant.
            hint = self.settings.reconnect_hint_ms
            data = self.framing.reconnect_hint(random.randint(hint, 2 * hint)) + data
        await self._write(data, last=True)
        return self._response

    # -- writing ----------------------------------------------------------------------------------------------

    async def _prepare(self) -> web.StreamResponse:
        request = self._request
        response = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": self.framing.content_type,
                # RFC 9111 §5.2.2.4: every client and proxy must revalidate; a cached token stream is useless.
                "Cache-Control": "no-cache",
                # nginx buffers proxied responses unless told not to; buffering would hold every token.
                "X-Accel-Buffering": "no",
                "X-Content-Type-Options": "nosniff",
                "X-Stream-Id": self.generation.id,
                **(self._headers or {}),
            },
        )
        self._negotiate_coding(response)
        if request.version < (1, 1):
            # An HTTP/1.0 body without a length ends with the connection (RFC 9112 §6.3): close it at the end
            # even if the client asked for keep-alive, or it would never see the end of the body.
            response.force_close()
        # No enable_compression(): zlib would hold every token until the end (see _negotiate_coding).
        await response.prepare(request)
        self._response = response
        return response

    def _negotiate_coding(self, response: web.StreamResponse) -> None:
        """Compress this body if the relay offers a coding the client accepts (server/compression.py): every
        write then goes through the compressor (`_write`), flushed, so no token waits for the next."""
        offered = self.settings.compression
        if not offered:
            return
        # RFC 9110 §12.5.5: the response depends on Accept-Encoding, whichever coding this one got.
        response.headers[hdrs.VARY] = hdrs.ACCEPT_ENCODING
        request = self._request
        if not may_compress(request.method, request.version, response.headers.get(hdrs.CACHE_CONTROL, "")):
            return
        coding = choose_coding(field_value(request.headers.getall(hdrs.ACCEPT_ENCODING, ())), offered)
        if coding != IDENTITY:
            response.headers[hdrs.CONTENT_ENCODING] = coding
            self._compressor = StreamCompressor(coding)

    async def _write(self, data: bytes, *, last: bool = False) -> bool:
        """Write `data` (ending the body when `last`) under the write timeout; False if the client is gone or too
        slow (then it is dropped: a client that stopped reading must not hold a growing buffer)."""
        timeout = self.settings.write_timeout
        deadlines = self._timers.write_deadlines
        slot: int | None = None
        try:
            response = self._response or await self._prepare()
            if self._compressor is not None:
                data = self._compressor.finish(data) if last else self._compressor.compress(data)
            # Every write under the write timeout: a write waits only in drain(), but a client that stops reading
            # makes it wait forever. If it is still waiting when its slot's timer fires, `_on_write_deadline` drops
            # the connection, which ends the wait.
            if timeout:
                slot = deadlines.add(self, self._loop.time() + timeout, timeout)
            await (response.write_eof(data) if last else response.write(data))
        except ConnectionError:
            self._gone = True
            if self.outcome != "slow_client":
                self.outcome = "disconnected"
            return False
        finally:
            if slot is not None:
                deadlines.discard(self, slot)
        if self.outcome == "slow_client":
            return False
        self.bytes_written += len(data)
        self._last_write = self._loop.time()
        if self._heartbeat_due:
            self._arm_heartbeat()
        if self._gone and not last:
            # The client's end arrived while this write waited (its FIN is acted on as it is read): the reader stops
            # here. (After the last write the response is whole: the caller records how it ended.)
            if self.outcome == "reading":
                self.outcome = "disconnected"
            return False
        return True
