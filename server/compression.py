"""Compressing a token stream without holding a token back: negotiation and a per-stream compressor. No IO.

A streamed response can be compressed only if every written batch of frames leaves the compressor whole: zlib keeps
input in its window until it has enough for a block, and a plain ``compress()`` (what aiohttp's
``enable_compression()`` does) returns nothing for a small frame, so the tokens would arrive at the end. A sync
flush (``Z_SYNC_FLUSH``, RFC 1951 §3.2.4's empty stored block) ends every batch on a byte boundary: a decoder then
outputs everything written so far, and the stream stays one deflate stream whose window (the JSON skeleton of the
previous frames) makes the next frame small. The end of the body finishes the stream (``Z_FINISH``: the last block
and the gzip trailer or zlib checksum).

Memory: one compressor per compressed stream, with a 4 KiB window (``WBITS`` 12, about 60 SSE frames of tokens:
enough for the repeated frame skeleton, where the sync flush's own bytes already dominate) and ``MEM_LEVEL`` 2:
`STATE_BYTES` per stream, a tenth of zlib's defaults (docs/compression.md has the measurements). The state is fixed:
a sync flush leaves no pending output inside zlib, so a reader whose client stopped reading holds no more than it
did (what waits is in the transport, under the write timeout), and ``Z_FINISH`` frees it.

>>> choose_coding("gzip, deflate, br", ("gzip", "deflate"))
'gzip'
>>> choose_coding("gzip;q=0.5, deflate", ("gzip", "deflate"))
'deflate'
>>> choose_coding(None, ("gzip",)), choose_coding("", ("gzip",)), choose_coding("br", ("gzip",))
('identity', 'identity', 'identity')
>>> compressor = StreamCompressor("gzip")
>>> inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
>>> inflate.decompress(compressor.compress(b'data: {"content":"Hi"}\\n\\n'))  # all of it, at once
b'data: {"content":"Hi"}\\n\\n'
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable
from functools import lru_cache

IDENTITY = "identity"
CODINGS = ("gzip", "deflate")
# RFC 9110 §8.4.1.3: "x-gzip" is gzip.
_ALIASES = {"x-gzip": "gzip"}

LEVEL = 6
WBITS = 12
MEM_LEVEL = 2
STATE_BYTES = 24 * 1024  # measured per compressor (tests/test_compression.py holds it to this)
# gzip: a gzip header and trailer around deflate data (wbits + 16). deflate: RFC 9110 §8.4.1.2 means the zlib
# format (RFC 1950: a header and an Adler-32 checksum), not raw deflate data.
_WBITS = {"gzip": 16 + WBITS, "deflate": WBITS}

# RFC 9110 §12.4.2: qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] )
_QVALUE = re.compile(r"0(\.\d{0,3})?|1(\.0{0,3})?")
# Directives under which no shared cache hands a stored response to another client (RFC 9111 §5.2.2.4 no-cache:
# not without validating it first, and a stream has no validator; §5.2.2.5 no-store; §5.2.2.7 private).
_NOT_SHARED = frozenset({"no-cache", "no-store", "private"})


def parse_codings(text: str) -> tuple[str, ...]:
    """The codings of ``--compression`` (``gzip,deflate``; ``off`` or empty for none), in the operator's order
    of preference; `ValueError` names an unknown one.

    >>> parse_codings("gzip, deflate"), parse_codings("off")
    (('gzip', 'deflate'), ())
    """
    chosen: list[str] = []
    for item in text.split(","):
        coding = item.strip().lower()
        if not coding or coding in {"off", "none", IDENTITY}:
            continue
        if coding not in CODINGS:
            raise ValueError(f"unknown coding {item.strip()!r}: use gzip, deflate or off")
        if coding not in chosen:
            chosen.append(coding)
    return tuple(chosen)


def choose_coding(accept_encoding: str | None, offered: Iterable[str]) -> str:
    """The content coding of a response to a request with this ``Accept-Encoding`` (RFC 9110 §12.5.3): one of
    `offered`, or ``identity``.

    * No field: ``identity``. The RFC lets a server pick any coding then, but a client that sent none (``curl``
      without ``--compressed``, many SDKs) would show compressed bytes.
    * An empty field: the client wants no coding.
    * The highest ``q`` wins; ``q=0`` is "not acceptable"; ``*`` stands for every coding not listed, ``identity``
      included; a coding tied with ``identity`` is chosen (the operator turned compression on); ties between
      codings follow `offered`'s order.
    * When nothing acceptable is offered, even with ``identity;q=0``: ``identity``, as §12.5.3 says ("the origin
      server ought to respond without any content coding").
    """
    offered = tuple(offered)
    if accept_encoding is None or not offered:
        return IDENTITY
    weights, star = _weights(accept_encoding)
    best, best_q = IDENTITY, 0.0
    for coding in offered:
        q = weights.get(coding, star)
        if q > best_q:
            best, best_q = coding, q
    if best != IDENTITY and best_q >= weights.get(IDENTITY, star):
        return best
    return IDENTITY


@lru_cache(maxsize=256)
def _weights(accept_encoding: str) -> tuple[dict[str, float], float]:
    """The q of each listed coding, and that of ``*`` (0 when absent). Clients send the same few values."""
    weights: dict[str, float] = {}
    star = 0.0
    for item in accept_encoding.split(","):
        name, *params = item.split(";")
        coding = name.strip().lower()
        if not coding:
            continue
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                value = value.strip()
                # A malformed weight makes the coding unacceptable: guessing could send what the client cannot read.
                q = float(value) if _QVALUE.fullmatch(value) else 0.0
        coding = _ALIASES.get(coding, coding)
        if coding == "*":
            star = max(q, star)  # a name listed twice counts at its best weight, * too
        else:
            weights[coding] = max(q, weights.get(coding, 0.0))
    return weights, star


def may_compress(method: str, version: tuple[int, int], cache_control: str) -> bool:
    """Whether a response may be compressed at all, whatever the client accepts.

    Never for HEAD (there is no body to compress, and announcing a coding for none misleads), never on HTTP/1.0
    (no chunked encoding: the body ends with the connection; and HTTP/1.0 caches ignore ``Vary``), and never for
    a response that a shared cache could hand to another client, which may not accept the coding (its
    ``Cache-Control`` must hold ``no-cache``, ``no-store`` or ``private``).
    """
    if method.upper() == "HEAD" or version < (1, 1):
        return False
    directives = {part.split("=", 1)[0].strip().lower() for part in cache_control.split(",")}
    return not directives.isdisjoint(_NOT_SHARED)


class StreamCompressor:
    """gzip or deflate (zlib format) for one streamed body: `compress(batch)` returns bytes that a decoder turns
    back into all of `batch` at once (sync flush); `finish(last)` ends the stream. Fixed memory (`STATE_BYTES`)."""

    __slots__ = ("_finished", "_zlib", "coding")

    def __init__(self, coding: str) -> None:
        if coding not in _WBITS:
            raise ValueError(f"not a coding this relay compresses with: {coding!r}")
        self.coding = coding
        self._zlib = zlib.compressobj(LEVEL, zlib.DEFLATED, _WBITS[coding], MEM_LEVEL)
        self._finished = False

    @property
    def finished(self) -> bool:
        return self._finished

    def compress(self, data: bytes) -> bytes:
        """`data` compressed and sync-flushed: nothing of it stays inside the compressor."""
        if self._finished:
            raise RuntimeError("compress() after finish(): the compressed stream has ended")
        return self._zlib.compress(data) + self._zlib.flush(zlib.Z_SYNC_FLUSH)

    def finish(self, data: bytes = b"") -> bytes:
        """`data` compressed, then the end of the stream; the compressor's memory is released."""
        if self._finished:
            raise RuntimeError("finish() twice: the compressed stream has ended")
        self._finished = True
        return self._zlib.compress(data) + self._zlib.flush(zlib.Z_FINISH)


__all__ = [
    "CODINGS",
    "IDENTITY",
    "STATE_BYTES",
    "StreamCompressor",
    "choose_coding",
    "may_compress",
    "parse_codings",
]
