"""An upstream body's content coding (RFC 9110 §8.4), undone in bounded steps. Bytes in, bytes out, no IO.

A compressed body can inflate a thousandfold (1 MB of gzip holds 1 GB of newlines). Inflating a whole network read
at once, as HTTP clients do, would hold that much memory and the event loop for as long as it takes; here every
piece of output is at most `piece_size` bytes and the next one is made only when it is asked for, so the reader
can hand each piece to the stream decoder (whose own bounds then apply) and let other tasks run in between.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

from .errors import UpstreamProtocolError

IDENTITY = "identity"
# The codings the relay's HTTP client offers (``Accept-Encoding: gzip, deflate``); x-gzip is gzip (RFC 9110 §8.4.1.3).
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def content_coding(header: str | None) -> str:
    """The one coding a ``Content-Encoding`` value names: ``identity``, ``gzip``, ``x-gzip`` or ``deflate``.

    >>> content_coding(None), content_coding("GZip"), content_coding("identity, deflate")
    ('identity', 'gzip', 'deflate')

    Codings applied in layers (``gzip, gzip``) or ones the relay never offered (``br``, ``zstd``) are refused: the
    body could not be read anyway, and saying so beats relaying bytes nobody can decode.
    """
    codings = [c for c in (part.strip().lower() for part in (header or "").split(",")) if c and c != IDENTITY]
    if not codings:
        return IDENTITY
    if len(codings) == 1 and codings[0] in _WBITS:
        return codings[0]
    raise UpstreamProtocolError("the model provider sent its reply in a content encoding the relay cannot read")


class BoundedInflater:
    """Undo gzip or deflate incrementally: `feed(compressed)` yields the decompressed bytes in pieces of at most
    `piece_size`, made lazily; `end()` checks that the compressed stream was whole.

    ``deflate`` is the zlib format (RFC 9110 §8.4.1.2), but some servers send raw deflate data: as browsers and
    httpx do, a body whose first bytes are not a zlib header is read as raw deflate.
    """

    __slots__ = ("_coding", "_inflater", "_piece_size", "_started")

    def __init__(self, coding: str, piece_size: int) -> None:
        if coding not in _WBITS:
            raise ValueError(f"not a compressed coding: {coding!r}")
        if piece_size < 1:
            raise ValueError("piece_size must be positive")
        self._coding = coding
        self._piece_size = piece_size
        self._inflater = zlib.decompressobj(_WBITS[coding])
        self._started = False

    def feed(self, data: bytes) -> Iterator[bytes]:
        inflater = self._inflater
        limit = self._piece_size
        while True:
            try:
                # max_length bounds the output of this call; the input it did not reach waits in unconsumed_tail.
                piece = inflater.decompress(data, limit)
            except zlib.error:
                if self._started or self._coding != "deflate":
                    raise UpstreamProtocolError("the model provider sent a corrupt compressed body") from None
                self._started = True
                inflater = self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
                continue
            self._started = True
            data = inflater.unconsumed_tail
            if piece:
                yield piece
            # A full piece may leave output inside zlib with no input left: ask again until a piece comes up short.
            if not data and len(piece) < limit:
                return

    def end(self) -> None:
        """The body ended: a compressed stream cut short is a broken reply, not a quiet end."""
        if self._started and not self._inflater.eof:
            raise UpstreamProtocolError("the model provider's compressed body ended before its end")
