"""`RelayStream._fits` is what lets `_deliver` (and `_flush_held`) write a frame with no write timeout and without
`_writing` set: it must mean the write cannot wait. With chunked transfer-encoding aiohttp wraps every frame in
``<hex len>\r\n`` ... ``\r\n`` (and write_eof adds ``0\r\n\r\n`` after that), which `_fits` must count: a frame
near the high-water mark would otherwise pause the protocol, and aiohttp's drain() (every 64 KiB written by
write(), always in write_eof()) would then wait for the client. A real socket pair that the peer does not read."""

from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace

import pytest
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_writer import StreamWriter

from server.framing import FRAMINGS
from server.stream import RelayStream, StreamSettings


async def _fits_but_waits(last: bool, size: int, gap: int) -> bool | None:
    """None if _fits() says no; else whether the write waited although _fits() said it could not."""
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    transport, protocol = await loop.create_connection(lambda: BaseProtocol(loop), sock=ours)
    try:
        writer = StreamWriter(protocol, loop)
        writer.enable_chunking()
        while transport.get_write_buffer_size() == 0:  # the client does not read: the transport holds bytes now
            transport.write(b"x" * 65536)
        high = transport.get_write_buffer_size() + 100_000
        transport.set_write_buffer_limits(high=high)
        await writer.write(b"y" * 66_000, drain=False)  # earlier frames: 64 KiB since aiohttp's last drain
        transport.write(b"f" * (high - transport.get_write_buffer_size() - size - gap))
        assert not protocol.writing_paused
        stream = RelayStream(None, None, FRAMINGS["sse"], StreamSettings())  # type: ignore[arg-type]
        stream._high_water = high
        if not stream._fits(SimpleNamespace(transport=transport, protocol=protocol), size):  # type: ignore[arg-type]
            return None
        frame = b"z" * size
        write = asyncio.ensure_future(writer.write_eof(frame) if last else writer.write(frame))
        await asyncio.sleep(0.02)
        waited = not write.done()
        write.cancel()
        return waited
    finally:
        transport.abort()
        theirs.close()
        await asyncio.sleep(0)


@pytest.mark.parametrize(
    ("last", "size"), [(False, 300), (False, 5000), (True, 20)], ids=["write-300B", "write-5000B", "write_eof-20B"]
)
async def test_a_write_that_fits_never_waits(last: bool, size: int) -> None:
    waited = [gap for gap in range(0, 16) if await _fits_but_waits(last, size, gap)]
    assert waited == [], f"_fits() said the write could not wait, yet it waited, {waited} bytes below high water"
