"""The load client's parsing (bench/client.py), fed bytes directly: every relay figure is counted here."""

from __future__ import annotations

import asyncio

from bench.client import Conn, Run, Spec

TOKENS = 4


def _stamped_chunk(stamp_us: int) -> bytes:
    frame = f'data: {{"text": "hi~t{stamp_us}~"}}\n\n'.encode()
    return f"{len(frame):x}\r\n".encode() + frame + b"\r\n"


def _conn() -> tuple[Conn, Run]:
    loop = asyncio.new_event_loop()
    try:
        run = Run(spec=Spec(port=0, path="/", mode="paced", stamps=True, tokens=TOKENS), loop=loop, pids=[])
    finally:
        loop.close()
    conn = Conn(run, 0)
    conn.measured = True  # as a stream started inside the measuring window is
    conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    return conn, run


def test_lag_by_place_counts_every_chunk_of_a_read() -> None:
    """A read that brings several chunks (a busy relay's burst) still tells the first token from the last."""
    conn, run = _conn()
    conn.data_received(b"".join(_stamped_chunk(1_000 + i) for i in range(TOKENS)))
    assert (len(run.relay_lag_first), len(run.relay_lag_middle), len(run.relay_lag_last)) == (1, TOKENS - 2, 1)
    assert len(run.relay_lag) == TOKENS


def test_lag_by_place_across_reads_and_split_stamps() -> None:
    conn, run = _conn()
    data = b"".join(_stamped_chunk(1_000 + i) for i in range(TOKENS))
    cut = data.index(b"~t1002") + 4  # inside the third token's stamp
    conn.data_received(data[:cut])
    conn.data_received(data[cut:])
    assert (len(run.relay_lag_first), len(run.relay_lag_middle), len(run.relay_lag_last)) == (1, TOKENS - 2, 1)
