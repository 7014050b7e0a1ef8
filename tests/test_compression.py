"""Compressed streams (server/compression.py and the Reader's write seam): negotiation, the per-stream compressor,
and over real sockets: every token decodes the moment it is written, the decompressed body is the uncompressed
one, resume replays and heartbeats are compressed too, and httpx and curl read it as it comes."""

from __future__ import annotations

import asyncio
import base64
import doctest
import gc
import json
import random
import shutil
import tracemalloc
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import httpx2
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

import server.compression
from server.app import create_app
from server.compression import (
    IDENTITY,
    STATE_BYTES,
    StreamCompressor,
    choose_coding,
    may_compress,
    parse_codings,
)
from server.config import Config, load_config
from server.events import Delta, Done, Reasoning
from server.framing import FRAMINGS
from server.reader import Reader
from server.state import RELAY

from .conftest import ServeApp, upstream_config
from .fake_upstream import Behavior, FakeUpstream
from .raw_http import read_head
from .scripted import ScriptedProvider, relay_host, wait_until
from .wire import sse_events

BOTH = ("gzip", "deflate")
COMPRESSED = Config(provider="demo", limits_enabled=False, heartbeat=0.0, compression=BOTH)
# What each coding's decoder is told: gzip (header and trailer), deflate = the zlib format (RFC 9110 §8.4.1.2).
DECODER_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def decompress_whole(body: bytes, coding: str) -> bytes:
    """`body` decoded, and checked to be one complete compressed stream with nothing after it."""
    inflater = zlib.decompressobj(DECODER_WBITS[coding])
    plain = inflater.decompress(body)
    assert inflater.eof, "the compressed stream was not finished"
    assert not inflater.unused_data
    return plain


def test_doctests() -> None:
    failures, tried = doctest.testmod(server.compression)
    assert tried
    assert not failures


# -- negotiation (RFC 9110 §12.5.3) ---------------------------------------------------------------------------

NEGOTIATION = [
    ("absent", None, BOTH, IDENTITY),
    ("empty field: no coding wanted", "", BOTH, IDENTITY),
    ("browser", "gzip, deflate, br, zstd", BOTH, "gzip"),
    ("curl --compressed", "deflate, gzip, br, zstd", BOTH, "gzip"),
    ("operator prefers deflate", "gzip, deflate", ("deflate", "gzip"), "deflate"),
    ("only deflate offered", "gzip, deflate", ("deflate",), "deflate"),
    ("higher q wins", "gzip;q=0.5, deflate", BOTH, "deflate"),
    ("q=0 refuses", "gzip;q=0, deflate;q=0.1", BOTH, "deflate"),
    ("all refused", "gzip;q=0, deflate;q=0", BOTH, IDENTITY),
    ("unknown codings only", "br, zstd", BOTH, IDENTITY),
    ("identity asked", "identity", BOTH, IDENTITY),
    ("identity preferred", "gzip;q=0.5, identity", BOTH, IDENTITY),
    ("a tie with identity compresses", "identity;q=0.5, gzip;q=0.5", BOTH, "gzip"),
    ("star", "*", BOTH, "gzip"),
    ("star covers identity too", "gzip;q=0.3, *;q=0.6", ("gzip",), IDENTITY),
    ("star with a refused coding", "*, gzip;q=0", BOTH, "deflate"),
    ("star refused, gzip named", "*;q=0, gzip", BOTH, "gzip"),
    ("identity;q=0 with nothing offered acceptable: still identity (§12.5.3)", "identity;q=0, br", BOTH, IDENTITY),
    ("identity;q=0 with gzip", "identity;q=0, gzip", BOTH, "gzip"),
    ("x-gzip is gzip (§8.4.1.3)", "x-gzip", BOTH, "gzip"),
    ("case and spaces", " GZip ; Q=1.0 ,DEFLATE;q=0.2", BOTH, "gzip"),
    ("three decimals", "gzip;q=0.001", BOTH, "gzip"),
    ("a malformed q is not acceptable", "gzip;q=0.0001, deflate;q=0.5", BOTH, "deflate"),
    ("q above 1 is not acceptable", "gzip;q=2, deflate;q=0.5", BOTH, "deflate"),
    ("q not a number", "gzip;q=high", BOTH, IDENTITY),
    ("empty elements", ",, gzip ,", BOTH, "gzip"),
    ("compression off", "gzip", (), IDENTITY),
]


@pytest.mark.parametrize(
    ("header", "offered", "expected"), [c[1:] for c in NEGOTIATION], ids=[c[0] for c in NEGOTIATION]
)
def test_choose_coding(header: str | None, offered: tuple[str, ...], expected: str) -> None:
    assert choose_coding(header, offered) == expected


_QS = ("1", "1.0", "0.9", "0.5", "0.25", "0.001", "0", "0.000")
_ELEMENT = st.tuples(
    st.sampled_from(["gzip", "deflate", "identity", "*", "br", "x-gzip", "GZIP"]), st.sampled_from(_QS)
)


@given(elements=st.lists(_ELEMENT, max_size=6), offered=st.permutations(BOTH))
def test_negotiation_never_picks_what_the_client_ranks_lower(
    elements: list[tuple[str, str]], offered: list[str]
) -> None:
    header = ", ".join(f"{name};q={q}" for name, q in elements)
    chosen = choose_coding(header, offered)
    weights: dict[str, float] = {}
    for name, q in elements:  # the client's weight for each name, x-gzip counting as gzip (RFC 9110 §8.4.1.3)
        key = "gzip" if name.lower() == "x-gzip" else name.lower()
        weights[key] = max(weights.get(key, 0.0), float(q))

    def weight(coding: str) -> float:
        return weights.get(coding, weights.get("*", 0.0))

    if chosen == IDENTITY:
        # Nothing offered was acceptable and preferred to identity.
        assert all(weight(c) == 0 or weight(c) < weight(IDENTITY) for c in offered)
    else:
        assert chosen in offered
        assert weight(chosen) > 0
        assert weight(chosen) >= weight(IDENTITY)
        assert all(weight(chosen) >= weight(other) for other in offered)


MAY_COMPRESS = [
    ("a stream", "GET", (1, 1), "no-cache", True),
    ("POST", "POST", (1, 1), "no-cache", True),
    ("no-store", "GET", (1, 1), "no-store", True),
    ("private", "GET", (1, 1), "private, max-age=60", True),
    ("HEAD", "HEAD", (1, 1), "no-cache", False),
    ("HTTP/1.0", "GET", (1, 0), "no-cache", False),
    ("cacheable by a proxy", "GET", (1, 1), "public, max-age=60", False),
    ("no Cache-Control: heuristically cacheable", "GET", (1, 1), "", False),
]


@pytest.mark.parametrize(
    ("method", "version", "cache_control", "expected"), [c[1:] for c in MAY_COMPRESS], ids=[c[0] for c in MAY_COMPRESS]
)
def test_may_compress(method: str, version: tuple[int, int], cache_control: str, expected: bool) -> None:
    assert may_compress(method, version, cache_control) is expected


def test_the_option_parses_and_refuses_what_it_cannot_do() -> None:
    assert Config().compression == ()
    assert load_config(["--compression", "gzip, deflate"]).compression == BOTH
    assert load_config(["--compression", "deflate,gzip,deflate"]).compression == ("deflate", "gzip")
    assert load_config([], {"LLM_RELAY_COMPRESSION": "gzip"}).compression == ("gzip",)
    assert load_config(["--compression", "off"]).compression == ()
    with pytest.raises(ValueError, match="unknown coding 'br'"):
        parse_codings("gzip,br")
    with pytest.raises(SystemExit):
        load_config(["--compression", "br"])


# -- the compressor -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("coding", BOTH)
@given(batches=st.lists(st.binary(max_size=3000), max_size=30))
def test_every_batch_decodes_whole_the_moment_it_is_compressed(coding: str, batches: list[bytes]) -> None:
    compressor = StreamCompressor(coding)
    inflater = zlib.decompressobj(DECODER_WBITS[coding])
    body = b""
    for batch in batches:
        piece = compressor.compress(batch)
        body += piece
        # Nothing of the batch waits for the next write.
        assert inflater.decompress(piece) == batch
    end = compressor.finish(b"the end")
    body += end
    assert inflater.decompress(end) == b"the end"
    assert inflater.eof
    assert decompress_whole(body, coding) == b"".join(batches) + b"the end"


def test_illegal_states() -> None:
    with pytest.raises(ValueError, match="not a coding"):
        StreamCompressor("br")
    compressor = StreamCompressor("gzip")
    compressor.finish()
    assert compressor.finished
    with pytest.raises(RuntimeError, match="after finish"):
        compressor.compress(b"x")
    with pytest.raises(RuntimeError, match="twice"):
        compressor.finish()


def _frames(count: int) -> list[bytes]:
    sse = FRAMINGS["sse"]
    words = ("the", "relay", "streams", "every", "token", "as", "soon", "as", "the", "model", "makes", "it")
    return [sse.encode("3f0c5e1a9b7d42c68e2f1a0b9c8d7e6f", i, Delta(" " + words[i % len(words)])) for i in range(count)]


@pytest.mark.parametrize("coding", BOTH)
def test_a_compressor_holds_its_stated_memory_and_no_more_however_long_the_stream(coding: str) -> None:
    frames = _frames(2000)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        compressor = StreamCompressor(coding)
        compressor.compress(frames[0])
        first = tracemalloc.get_traced_memory()[0] - before
        for frame in frames[1:]:
            compressor.compress(frame)
        later = tracemalloc.get_traced_memory()[0] - before
        compressor.finish()
        finished = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # zlib allocates through Python's raw allocator, so tracemalloc sees its state.
    assert STATE_BYTES * 0.8 < first <= STATE_BYTES * 1.1
    assert later <= first + 1024  # 2,000 frames later: the same state
    assert finished < 2048  # Z_FINISH releases it


def test_sse_tokens_compress_several_fold_even_flushed_one_by_one() -> None:
    frames = _frames(500)
    compressor = StreamCompressor("gzip")
    wire = sum(len(compressor.compress(frame)) for frame in frames) + len(compressor.finish())
    assert sum(map(len, frames)) / wire > 3


# -- over real sockets ----------------------------------------------------------------------------------------


async def _scripted(serve: ServeApp, config: Config = COMPRESSED) -> tuple[str, ScriptedProvider, web.Application]:
    provider = ScriptedProvider()
    host, api = relay_host(config, provider)
    return await serve(host), provider, api


async def _inflate_until(
    resp: aiohttp.ClientResponse, inflater: zlib._Decompress, size: int, timeout: float = 5.0
) -> bytes:
    """Read the raw (compressed) body until `size` decompressed bytes came out; fails if they never do."""
    out = b""
    async with asyncio.timeout(timeout):
        while len(out) < size:
            chunk = await resp.content.readany()
            assert chunk, f"the body ended with {out!r}"
            out += inflater.decompress(chunk)
    return out


@pytest.mark.parametrize("framing", ["sse", "ndjson"])
@pytest.mark.parametrize("coding", BOTH)
async def test_each_token_decodes_before_the_next_one_exists(
    serve: ServeApp, http: aiohttp.ClientSession, coding: str, framing: str
) -> None:
    base, provider, _ = await _scripted(serve)
    encode = FRAMINGS[framing].encode
    request = asyncio.create_task(
        http.get(
            f"{base}/api/chat",
            params={"prompt": "x", "format": framing},
            headers={"Accept-Encoding": coding},
            auto_decompress=False,
        )
    )
    await provider.started.wait()
    provider.put([Delta("first")])
    resp = await request
    assert resp.headers["Content-Encoding"] == coding
    assert resp.headers["Vary"] == "Accept-Encoding"
    sid = resp.headers["X-Stream-Id"]
    inflater = zlib.decompressobj(DECODER_WBITS[coding])
    events = [Delta("first"), Reasoning("hmm"), Delta(" sécond ✓"), Delta(" third")]
    for seq, event in enumerate(events, 1):
        if seq > 1:
            provider.put([event])
        frame = encode(sid, seq, event)
        # The provider has produced nothing more, yet the whole frame already decodes on the client's side.
        assert await _inflate_until(resp, inflater, len(frame)) == frame
    provider.put([Done("stop")])
    done = encode(sid, len(events) + 1, Done("stop"))
    assert await _inflate_until(resp, inflater, len(done)) == done
    assert inflater.decompress(await resp.read()) == b""
    assert inflater.eof  # the end of the body finished the compressed stream
    resp.release()


@pytest.mark.parametrize("framing", ["sse", "ndjson"])
@pytest.mark.parametrize("coding", BOTH)
async def test_the_decompressed_body_and_a_compressed_replay_are_the_uncompressed_bytes(
    serve: ServeApp, http: aiohttp.ClientSession, coding: str, framing: str
) -> None:
    base, provider, _ = await _scripted(serve)
    provider.put([Delta("Hello")], [Delta(", wörld"), Reasoning("why")], [Delta("!" * 500)], [Done("stop")], None)
    gzip_first = {"Accept-Encoding": coding}
    async with http.get(
        f"{base}/api/chat",
        params={"prompt": "x", "resume": "1", "format": framing},
        headers=gzip_first,
        auto_decompress=False,
    ) as resp:
        assert resp.headers["Content-Encoding"] == coding
        live = decompress_whole(await resp.read(), coding)
        sid = resp.headers["X-Stream-Id"]
    replay_url = f"{base}/api/streams/{sid}"
    replay_params = {"after": "0", "format": framing}
    async with http.get(replay_url, params=replay_params, headers={"Accept-Encoding": "identity"}) as plain:
        assert "Content-Encoding" not in plain.headers
        assert plain.headers["Vary"] == "Accept-Encoding"
        uncompressed = await plain.read()
    opening = FRAMINGS[framing].opening(sid, COMPRESSED.reconnect_hint_ms)
    assert live == opening + uncompressed
    # A resume replay is compressed as well.
    async with http.get(replay_url, params=replay_params, headers=gzip_first, auto_decompress=False) as replay:
        assert replay.headers["Content-Encoding"] == coding
        assert decompress_whole(await replay.read(), coding) == uncompressed


async def test_heartbeats_are_compressed_and_flushed_too(serve: ServeApp, http: aiohttp.ClientSession) -> None:
    base, provider, _ = await _scripted(serve, COMPRESSED.with_changes(heartbeat=0.05))
    async with http.get(
        f"{base}/api/chat", params={"prompt": "x"}, headers={"Accept-Encoding": "gzip"}, auto_decompress=False
    ) as resp:
        inflater = zlib.decompressobj(DECODER_WBITS["gzip"])
        ping = FRAMINGS["sse"].keepalive()
        assert await _inflate_until(resp, inflater, 2 * len(ping)) == 2 * ping
        provider.put([Done("stop")])
        rest = inflater.decompress(await resp.read())
    assert sse_events(rest)[-1][0] == "done"
    assert inflater.eof


async def test_no_compression_unless_offered_and_accepted(serve: ServeApp, http: aiohttp.ClientSession) -> None:
    base, provider, _ = await _scripted(serve)
    provider.put([Delta("a"), Done("stop")], None)
    # No Accept-Encoding at all (curl without --compressed): identity, and the response says it varies.
    async with http.get(f"{base}/api/chat", params={"prompt": "x"}, skip_auto_headers=["Accept-Encoding"]) as resp:
        assert "Content-Encoding" not in resp.headers
        assert resp.headers["Vary"] == "Accept-Encoding"
        assert [kind for kind, _, _ in sse_events(await resp.read())] == ["message", "done"]
    # Refusals are small JSON bodies, never compressed.
    async with http.get(f"{base}/api/chat", headers={"Accept-Encoding": "gzip"}) as refused:
        assert refused.status == 400
        assert "Content-Encoding" not in refused.headers
        assert (await refused.json())["error"]["type"] == "invalid_request"

    base_off, provider_off, _ = await _scripted(serve, COMPRESSED.with_changes(compression=()))
    provider_off.put([Delta("a"), Done("stop")], None)
    async with http.get(f"{base_off}/api/chat", params={"prompt": "x"}, headers={"Accept-Encoding": "gzip"}) as off:
        assert "Content-Encoding" not in off.headers
        assert "Vary" not in off.headers
        assert [kind for kind, _, _ in sse_events(await off.read())] == ["message", "done"]


async def test_accept_encoding_on_several_lines_is_one_list(serve: ServeApp) -> None:
    base, provider, _ = await _scripted(serve)
    provider.put([Delta("a"), Done("stop")], None)
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"GET /api/chat?prompt=x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Accept-Encoding: br\r\nAccept-Encoding: deflate\r\n\r\n"
    )
    status, headers = await asyncio.wait_for(read_head(reader), 5)
    await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert status == 200
    assert headers["content-encoding"] == "deflate"


async def test_never_on_http_10(serve: ServeApp) -> None:
    base, provider, _ = await _scripted(serve)
    provider.put([Delta("old"), Done("stop")], None)
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /api/chat?prompt=x HTTP/1.0\r\nHost: 127.0.0.1\r\nAccept-Encoding: gzip, deflate\r\n\r\n")
    raw = await asyncio.wait_for(reader.read(), 5)  # the body ends with the connection
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"content-encoding" not in head.lower()
    assert [kind for kind, _, _ in sse_events(body)] == ["message", "done"]


@pytest.mark.parametrize("coding", BOTH)
async def test_httpx_reads_each_line_as_it_is_produced(serve: ServeApp, coding: str) -> None:
    base, provider, _ = await _scripted(serve)
    provider.put([Delta("one")])  # the response head goes out with the first frame
    async with (
        httpx2.AsyncClient() as client,
        client.stream(
            "GET", f"{base}/api/chat", params={"prompt": "x", "format": "ndjson"}, headers={"Accept-Encoding": coding}
        ) as resp,
    ):
        assert resp.headers["Content-Encoding"] == coding
        lines = aiter(resp.aiter_lines())
        for seq, token in enumerate(["one", " two", " three"], 1):
            if seq > 1:
                provider.put([Delta(token)])
            line = await asyncio.wait_for(anext(lines), 5)
            assert line == f'{{"type":"delta","seq":{seq},"content":"{token}"}}'
        provider.put([Done("stop")])
        assert '"type":"done"' in await asyncio.wait_for(anext(lines), 5)
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(anext(lines), 5)


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")
async def test_curl_compressed_prints_each_token_as_it_is_produced(serve: ServeApp, tmp_path: Path) -> None:
    base, provider, _ = await _scripted(serve)
    heads = tmp_path / "headers"
    curl = await asyncio.create_subprocess_exec(
        "curl", "-sSN", "--compressed", "-D", str(heads), f"{base}/api/chat?prompt=x&format=ndjson",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert curl.stdout is not None
    try:
        await provider.started.wait()
        for token in ["curl", " sees", " this"]:
            provider.put([Delta(token)])
            line = await asyncio.wait_for(curl.stdout.readline(), 5)
            assert f'"content":"{token}"' in line.decode()
        provider.put([Done("stop")])
        assert b'"type":"done"' in await asyncio.wait_for(curl.stdout.readline(), 5)
        assert await asyncio.wait_for(curl.wait(), 5) == 0  # curl checks the end of the compressed stream
    finally:
        if curl.returncode is None:
            curl.kill()
            await curl.wait()
    assert "content-encoding: gzip" in heads.read_text().lower()


# -- a client that stops reading ------------------------------------------------------------------------------


def _compressor_memory(snapshot: tracemalloc.Snapshot) -> int:
    """Bytes allocated from server/compression.py and still alive: compressor states and their output that the
    transport still holds."""
    kept = snapshot.filter_traces([tracemalloc.Filter(True, "*/server/compression.py")])
    return sum(stat.size for stat in kept.statistics("filename"))


async def _stalled_clients(base: str, count: int) -> AsyncIterator[asyncio.StreamWriter]:
    host, port = base.removeprefix("http://").split(":")
    for _ in range(count):
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"GET /api/chat?prompt=x&format=ndjson HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept-Encoding: gzip\r\n\r\n"
        )
        await writer.drain()
        yield writer  # and never read


async def test_stalled_compressed_readers_hold_bounded_memory_and_are_dropped(
    fake_upstream: FakeUpstream, serve: ServeApp
) -> None:
    # Tokens that compress little (random base64, longer than the compressor's window): the stream is far larger
    # than socket buffers even compressed, so writes to a client that reads nothing must block.
    token = base64.b64encode(random.Random(19).randbytes(12_000)).decode()
    fake_upstream.behavior = Behavior(tokens=[token] * 4_000)
    count = 6
    app = create_app(upstream_config(fake_upstream, write_timeout=1.5, send_buffer=65_536, compression=("gzip",)))
    base = await serve(app)
    gc.collect()
    tracemalloc.start()
    writers: list[asyncio.StreamWriter] = []
    try:
        async for writer in _stalled_clients(base, count):
            writers.append(writer)
        streams = app[RELAY].streams
        await wait_until(lambda: streams.readers == count)
        # Sampled until the write timeout has dropped every one of them: never more than, per stream, the
        # compressor's fixed state and compressed output no larger than what the transport holds before writes
        # wait (its high-water mark, 64 KiB, plus the write that crossed it).
        samples = []
        async with asyncio.timeout(20):
            while streams.readers:
                samples.append(_compressor_memory(tracemalloc.take_snapshot()))
                await asyncio.sleep(0.05)
        assert count * STATE_BYTES * 0.8 < max(samples) <= count * (STATE_BYTES + 256 * 1024)
        # The write timeout dropped them (each after its writes were blocked for 1.5 s); their compressors go too,
        # once each reader's task has wound down (a few loop turns after its generation ended, later on a busy
        # machine).
        assert await streams.wait_idle(10)

        def freed() -> bool:
            gc.collect()
            return _compressor_memory(tracemalloc.take_snapshot()) < count * 4096

        await wait_until(freed, timeout=10)
    finally:
        tracemalloc.stop()
        for writer in writers:
            writer.close()


async def test_a_shutdown_ends_the_compressed_stream_whole(http: aiohttp.ClientSession) -> None:
    provider = ScriptedProvider()
    host, _ = relay_host(COMPRESSED.with_changes(shutdown_grace=1.0), provider)
    runner = web.AppRunner(host, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    address, port = runner.addresses[0][:2]
    provider.put([Delta("before the restart")])
    resp = await http.get(
        f"http://{address}:{port}/api/chat", params={"prompt": "x"}, headers={"Accept-Encoding": "gzip"},
        auto_decompress=False,
    )  # fmt: skip
    inflater = zlib.decompressobj(DECODER_WBITS["gzip"])
    first = await _inflate_until(resp, inflater, 1)
    await runner.cleanup()
    body = first + inflater.decompress(await resp.read())
    assert inflater.eof  # the in-band error and the retry hint, then the end of the gzip stream
    events = sse_events(body)
    assert [kind for kind, _, _ in events] == ["message", "error"]
    assert events[-1][1]["error"]["type"] == "server_shutdown"
    assert b"retry: " in body


async def test_a_reader_with_nothing_left_to_write_still_ends_its_compressed_body(
    serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    provider = ScriptedProvider()
    host, api = relay_host(COMPRESSED, provider)
    state = api[RELAY]

    async def read_after_the_end(request: web.Request) -> web.StreamResponse:
        # A reader that joins an ended stream after its last event (the handlers answer that with 204; a reader
        # made elsewhere, e.g. for another store, may not): prepared at once, it has nothing to write.
        generation = state.streams.get(request.match_info["id"])
        assert generation is not None
        after = generation.log.last_seq
        reader = Reader(request, generation, state.streams, FRAMINGS["sse"], state.reader_settings, after=after,
                        prepare_now=True)  # fmt: skip
        return await reader.run()

    host.router.add_get("/after-the-end/{id}", read_after_the_end)
    base = await serve(host)
    provider.put([Delta("a"), Done("stop")], None)
    async with http.get(f"{base}/api/chat", params={"prompt": "x", "resume": "1"}) as resp:
        await resp.read()
        sid = resp.headers["X-Stream-Id"]
    async with http.get(
        f"{base}/after-the-end/{sid}", headers={"Accept-Encoding": "gzip"}, auto_decompress=False
    ) as late:
        assert late.headers["Content-Encoding"] == "gzip"
        assert decompress_whole(await late.read(), "gzip") == b""  # an empty body, but a whole gzip stream


async def _inflate_until_text(resp: aiohttp.ClientResponse, inflater: zlib._Decompress, text: bytes) -> bytes:
    """Read the raw body until `text` has come out of the decompressor; fails if it never does."""
    out = b""
    async with asyncio.timeout(5.0):
        while text not in out:
            chunk = await resp.content.readany()
            assert chunk, f"the body ended with {out!r}"
            out += inflater.decompress(chunk)
    return out


@pytest.mark.parametrize("endpoint", ["openai-stream", "ui-stream"])
async def test_the_openai_and_ui_stream_outputs_compress_token_by_token(
    serve: ServeApp, http: aiohttp.ClientSession, endpoint: str
) -> None:
    provider = ScriptedProvider()
    host, _ = relay_host(COMPRESSED, provider, openai_prefix="/v1")
    base = await serve(host)
    url, body = (
        (
            f"{base}/v1/chat/completions",
            {"model": "llm-relay-demo", "messages": [{"role": "user", "content": "x"}], "stream": True},
        )
        if endpoint == "openai-stream"
        else (
            f"{base}/api/ui-chat",
            {"id": "c1", "messages": [{"id": "m", "role": "user", "parts": [{"type": "text", "text": "x"}]}]},
        )
    )
    request = asyncio.create_task(http.post(url, json=body, headers={"Accept-Encoding": "gzip"}, auto_decompress=False))
    await provider.started.wait()
    provider.put([Delta("first-token")])
    resp = await request
    assert resp.headers["Content-Encoding"] == "gzip"
    inflater = zlib.decompressobj(DECODER_WBITS["gzip"])
    # The provider has produced nothing more, yet the token already decodes on the client's side.
    seen = await _inflate_until_text(resp, inflater, b"first-token")
    provider.put([Delta("second-token")])
    seen += await _inflate_until_text(resp, inflater, b"second-token")
    provider.put([Done("stop")])
    seen += inflater.decompress(await resp.read())
    assert inflater.eof  # the end of the body finished the compressed stream
    assert seen.rstrip().endswith(b"data: [DONE]")
    resp.release()


async def test_a_whole_openai_completion_is_compressed(serve: ServeApp, http: aiohttp.ClientSession) -> None:
    provider = ScriptedProvider()
    host, _ = relay_host(COMPRESSED, provider, openai_prefix="/v1")
    base = await serve(host)
    provider.put([Delta("Hello")], [Delta(" there")], [Done("stop")], None)
    body = {"model": "llm-relay-demo", "messages": [{"role": "user", "content": "x"}]}
    async with http.post(
        f"{base}/v1/chat/completions", json=body, headers={"Accept-Encoding": "deflate"}, auto_decompress=False
    ) as resp:
        assert resp.headers["Content-Encoding"] == "deflate"
        completion = json.loads(decompress_whole(await resp.read(), "deflate"))
    assert completion["choices"][0]["message"]["content"] == "Hello there"
