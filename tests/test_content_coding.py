"""server/content_coding.py: Content-Encoding values, and gzip/deflate undone in bounded pieces."""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.content_coding import BoundedInflater, content_coding
from server.errors import UpstreamProtocolError


def compress(data: bytes, coding: str) -> bytes:
    wbits = {"gzip": 31, "x-gzip": 31, "deflate": 15, "raw-deflate": -15}[coding]
    packer = zlib.compressobj(9, zlib.DEFLATED, wbits)
    return packer.compress(data) + packer.flush()


def inflate(chunks: list[bytes], coding: str, piece_size: int) -> list[bytes]:
    inflater = BoundedInflater(coding, piece_size)
    pieces = [piece for chunk in chunks for piece in inflater.feed(chunk)]
    inflater.end()
    return pieces


@pytest.mark.parametrize(
    ("header", "coding"),
    [(None, "identity"), ("", "identity"), ("identity", "identity"), ("gzip", "gzip"), (" GZIP ", "gzip"),
     ("x-gzip", "x-gzip"), ("deflate", "deflate"), ("identity, gzip", "gzip"), ("gzip, identity", "gzip")],
)  # fmt: skip
def test_content_coding(header: str | None, coding: str) -> None:
    assert content_coding(header) == coding


@pytest.mark.parametrize("header", ["br", "zstd", "compress", "gzip, gzip", "gzip, br", "bogus"])
def test_a_coding_the_relay_did_not_offer_is_a_protocol_error(header: str) -> None:
    with pytest.raises(UpstreamProtocolError):
        content_coding(header)


@pytest.mark.parametrize("coding", ["gzip", "x-gzip", "deflate"])
@settings(max_examples=60, deadline=None)
@given(body=st.binary(max_size=3000), piece_size=st.integers(1, 700), data=st.data())
def test_any_body_in_any_chunking_inflates_exactly_in_bounded_pieces(
    coding: str, body: bytes, piece_size: int, data: st.DataObject
) -> None:
    packed = compress(body, coding)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(packed)), max_size=10)))
    chunks = [packed[a:b] for a, b in zip([0, *cuts], [*cuts, len(packed)], strict=True)]
    pieces = inflate(chunks, coding, piece_size)
    assert b"".join(pieces) == body
    assert all(0 < len(piece) <= piece_size for piece in pieces)


def test_raw_deflate_is_read_as_browsers_do() -> None:
    assert b"".join(inflate([compress(b"data: x\n\n", "raw-deflate")], "deflate", 4)) == b"data: x\n\n"


def test_a_bomb_is_inflated_lazily_one_bounded_piece_at_a_time() -> None:
    # 64 MiB of newlines in ~64 KB of gzip, as one network read: nothing is inflated before it is asked for,
    # and each piece is at most the piece size, so the reader decides how much to inflate.
    packed = compress(b"\n" * (64 << 20), "gzip")
    assert len(packed) < 100_000
    pieces = BoundedInflater("gzip", 16 * 1024).feed(packed)
    first = [next(pieces) for _ in range(3)]
    assert [len(piece) for piece in first] == [16 * 1024] * 3


def _flipped(coding: str) -> bytes:
    packed = bytearray(compress(bytes(range(256)) * 64, coding))
    packed[-6] ^= 0xFF  # in the gzip trailer's CRC, or the end of the deflate data
    return bytes(packed)


@pytest.mark.parametrize(
    ("coding", "body"),
    [("gzip", b"not compressed at all"), ("deflate", b"\xff" * 30), ("gzip", _flipped("gzip")),
     ("deflate", _flipped("deflate"))],
    ids=["gzip-plain-text", "deflate-garbage", "gzip-corrupt", "deflate-corrupt"],
)  # fmt: skip
def test_a_corrupt_body_is_a_protocol_error(coding: str, body: bytes) -> None:
    with pytest.raises(UpstreamProtocolError):
        inflate([body], coding, 64)


def test_a_body_cut_short_is_a_protocol_error() -> None:
    packed = compress(b"data: x\n\n" * 100, "gzip")
    inflater = BoundedInflater("gzip", 64)
    list(inflater.feed(packed[: len(packed) // 2]))
    with pytest.raises(UpstreamProtocolError):
        inflater.end()


def test_misuse_is_refused() -> None:
    with pytest.raises(ValueError, match="not a compressed coding"):
        BoundedInflater("identity", 10)
    with pytest.raises(ValueError, match="positive"):
        BoundedInflater("gzip", 0)


def test_docstring_examples() -> None:
    import doctest

    import server.content_coding

    failures, tried = doctest.testmod(server.content_coding)
    assert (failures, tried > 0) == (0, True)
