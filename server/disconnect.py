"""Learn that a client left the moment its connection closes, whatever the host app's settings.

aiohttp cancels a handler on disconnect only with ``handler_cancellation=True``, a setting of the host's runner
that defaults to off; otherwise a disconnect shows only at the next write, which may be seconds away while the
upstream is still thinking (and paid for). Polling every stream's transport costs CPU per stream per tick.

Instead, for the life of one stream, a thin protocol is placed between the transport and aiohttp's own protocol
(``BaseTransport.set_protocol``, public asyncio API). It forwards every callback unchanged and also calls the
stream's callback as soon as the connection is over: no polling, no timers, no patching of aiohttp, and the
original protocol is put back when the stream ends so keep-alive goes on as before.

"As soon as" is the callback in which the client's end arrives. A client that closes (a tab, ``fetch`` aborted)
sends FIN: the transport calls ``eof_received`` from its read callback, then closes the connection itself (aiohttp
does not keep a half-closed one open) and calls ``connection_lost`` only from a callback it queues, behind
everything the loop has queued by then. When many clients leave at once, that is every stream's tokens and the
teardown of every stream that left before, all ahead of telling the upstream. So the tap closes the transport and
calls back from ``eof_received`` itself; a reset or an error, which has no ``eof_received``, reaches it through
``connection_lost`` as before.

The other direction is `close_now`: a connection the relay gives up (the upstream of a stream whose last client
left) is shut down in the calling callback, not a loop turn later.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from aiohttp import web


class _DisconnectTap(asyncio.Protocol):
    __slots__ = ("_inner", "_on_lost", "_transport")

    def __init__(self, inner: asyncio.Protocol, transport: asyncio.BaseTransport, on_lost: Callable[[], None]) -> None:
        self._inner = inner
        self._transport = transport
        self._on_lost: Callable[[], None] | None = on_lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        keep_open = self._inner.eof_received()
        if not keep_open and self._on_lost is not None:
            # The transport closes itself once this returns (asyncio's and uvloop's alike, for a protocol that does
            # not keep the connection open). Closing it first changes nothing in what follows (close() is idempotent)
            # but its order: aiohttp's connection_lost is queued before anything the callback below wakes.
            self._transport.close()
            self._lost()
        return keep_open

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self._inner.connection_lost(exc)
        finally:
            self._lost()

    def _lost(self) -> None:
        on_lost, self._on_lost = self._on_lost, None
        if on_lost is not None:
            on_lost()


def _set_user_timeout(transport: asyncio.BaseTransport, milliseconds: int) -> int | None:
    """Set TCP_USER_TIMEOUT (Linux, RFC 5482); returns the previous value, or None where unsupported.

    A peer that vanished without FIN or RST (a phone leaving wifi) never acknowledges what we send; with this
    option the kernel aborts the connection once sent data has waited unacknowledged that long, which reaches us
    as ``connection_lost``. Without it the kernel retransmits for about 15 minutes, and a stream that only sends
    heartbeats never fills its buffer enough for the write timeout to fire.
    """
    option = getattr(socket, "TCP_USER_TIMEOUT", None)
    sock = transport.get_extra_info("socket")
    if option is None or sock is None:
        return None
    try:
        previous = int(sock.getsockopt(socket.IPPROTO_TCP, option))
        if previous != milliseconds:
            sock.setsockopt(socket.IPPROTO_TCP, option, milliseconds)
    except (OSError, AttributeError):  # not TCP (a Unix socket), or a transport without socket options
        return None
    return previous


def _set_option(transport: asyncio.BaseTransport, level: int, option: int, value: int) -> None:
    """`setsockopt` on the transport's socket; one without options (not TCP, or no socket) stays as it is."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    try:
        sock.setsockopt(level, option, value)
    except (OSError, AttributeError):
        return


def close_now(transport: asyncio.Transport) -> None:
    """Close `transport`'s connection: the peer is sent its end (FIN) in this call, then the transport is aborted.

    ``abort()`` alone only schedules the close: asyncio and uvloop both close the socket in a callback queued with
    ``call_soon``, behind everything the loop has queued by then. When many clients leave in the same instant, that
    is the teardown of every stream that left before (its reader's task, its generation's task, the access line),
    so the last upstream would be told last, after all of it. ``shutdown(2)`` ends the connection on the wire at
    once; ``abort()`` then releases the descriptor and tells the protocol as before.
    """
    if not transport.is_closing():
        _shut_down(transport)
    transport.abort()


def _shut_down(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    fileno = sock.fileno() if sock is not None else -1
    if fileno < 0:
        return
    try:
        # uvloop's transport socket refuses shutdown() (only the transport may change its state; asyncio's allows
        # it). A socket object made on the same descriptor makes the same call and is detached before it could
        # close it: the transport still owns the descriptor, and its abort() below is what closes it.
        shut = socket.socket(sock.family, sock.type, sock.proto, fileno=fileno)
    except OSError:
        return
    try:
        shut.shutdown(socket.SHUT_RDWR)
    except OSError:  # already reset by the peer, or not connected: abort() does the rest
        pass
    finally:
        shut.detach()


class watch_disconnect:  # lower case: a context manager used like a function, as contextlib's own are
    """Call `on_lost` (once, from the event loop) if the client's connection closes inside this block: from the
    callback in which its end arrives (see the module's doc).

    With `user_timeout` (seconds), a peer that stops acknowledging data for that long is treated as gone too.
    With `send_buffer` (bytes), the connection's kernel send buffer is fixed at that size (it stays so for the
    rest of the connection: the kernel cannot return a socket to autotuning).

    A class rather than a ``@contextmanager`` generator: it is entered once per stream, and the generator's
    machinery cost more than the work itself (and a few hundred bytes more per open stream).
    """

    __slots__ = ("_on_lost", "_ours", "_previous_timeout", "_send_buffer", "_tap", "_transport")

    def __init__(
        self,
        request: web.BaseRequest,
        on_lost: Callable[[], None],
        *,
        user_timeout: float = 0.0,
        send_buffer: int = 0,
    ) -> None:
        self._transport = request.transport
        self._on_lost = on_lost
        self._ours = int(user_timeout * 1000)
        self._send_buffer = send_buffer
        self._tap: _DisconnectTap | None = None
        self._previous_timeout: int | None = None

    def __enter__(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            self._on_lost()
            return
        inner = transport.get_protocol()
        if not isinstance(inner, asyncio.Protocol):  # pragma: no cover - aiohttp's is always one
            raise RuntimeError("cannot watch a connection whose protocol is not an asyncio.Protocol")
        self._tap = _DisconnectTap(inner, transport, self._on_lost)
        transport.set_protocol(self._tap)
        if self._ours > 0:
            self._previous_timeout = _set_user_timeout(transport, self._ours)
        if self._send_buffer > 0:
            # A fixed SO_SNDBUF turns off the kernel's send-buffer autotuning for this connection, which otherwise
            # lets a client that stops reading park megabytes in kernel memory before our write timeout can start.
            _set_option(transport, socket.SOL_SOCKET, socket.SO_SNDBUF, self._send_buffer)

    def __exit__(self, *exc_info: object) -> None:
        transport, tap = self._transport, self._tap
        if transport is None or tap is None:
            return
        self._tap = None
        if transport.get_protocol() is tap:
            transport.set_protocol(tap._inner)
        previous = self._previous_timeout
        if previous is not None and previous != self._ours and not transport.is_closing():
            # Only a set: the value it replaces is ours (uvloop makes a socket object for every get or set).
            _set_option(transport, socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, previous)
