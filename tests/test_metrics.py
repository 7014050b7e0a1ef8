"""server/metrics.py: Prometheus metrics after real streams, scraped over HTTP and read with prometheus-client's own
parser: done, upstream errors, a client leaving, a timeout, refusals, a resume; a listener of its own; an
embedding app; several gunicorn workers aggregated (multiprocess mode)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from server.app import create_relay_app
from server.config import Config
from server.metrics import RelayMetrics

from .conftest import ServeApp, ServeStandalone, upstream_config
from .fake_upstream import Behavior, FakeUpstream
from .processes import ROOT, clean_env, free_port, start_gunicorn, stop_gunicorn

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
SSE = {"Accept": "text/event-stream"}
NDJSON = {"Accept": "application/x-ndjson"}


def parse(text: str) -> Samples:
    """Every sample of an exposition, by name and labels, through prometheus-client's own parser."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 for a labelled series that was never touched (as PromQL would treat it)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(http: aiohttp.ClientSession, url: str) -> Samples:
    async with http.get(url) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        return parse(await response.text())


async def scrape_until(
    http: aiohttp.ClientSession, url: str, ready: Callable[[Samples], object], timeout: float = 10.0
) -> Samples:
    """Scrape until `ready` holds (an observer is told when a stream or reader has ended, just after its last
    byte left); fail after a generous `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        samples = await scrape(http, url)
        if ready(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"metrics never got ready: {sorted(samples.items())[:60]}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def relay(fake_upstream: FakeUpstream, serve_standalone: ServeStandalone) -> Callable[..., Awaitable[str]]:
    async def start(**changes: object) -> str:
        return await serve_standalone(upstream_config(fake_upstream, **changes))

    return start


async def test_done_streams_by_framing_events_bytes_and_first_token(
    relay: Callable[..., Awaitable[str]], http: aiohttp.ClientSession
) -> None:
    base = await relay()
    async with http.get(f"{base}/api/chat", params={"prompt": "x"}, headers=SSE) as response:
        sse_body = await response.read()
    async with http.post(f"{base}/api/chat", json={"prompt": "x"}, headers=NDJSON) as response:
        ndjson_body = await response.read()
    samples = await scrape_until(
        http, f"{base}/metrics", lambda s: value(s, "llm_relay_readers_ended_total", framing="ndjson", outcome="done")
    )
    for framing, body in (("sse", sse_body), ("ndjson", ndjson_body)):
        assert value(samples, "llm_relay_streams_started_total", framing=framing) == 1
        assert value(samples, "llm_relay_streams_ended_total", framing=framing, outcome="done") == 1
        assert value(samples, "llm_relay_readers_ended_total", framing=framing, outcome="done") == 1
        # The fake upstream's four tokens ("Hello", ",", " world", "!"); the end is not an event counted.
        assert value(samples, "llm_relay_stream_events_total", framing=framing) == 4
        assert value(samples, "llm_relay_bytes_sent_total", framing=framing) == len(body)
    assert value(samples, "llm_relay_time_to_first_token_seconds_count") == 2
    # The fake upstream reports 7 prompt tokens and one completion token per token sent.
    assert value(samples, "llm_relay_usage_tokens_total", kind="prompt") == 14
    assert value(samples, "llm_relay_usage_tokens_total", kind="completion") == 8
    assert value(samples, "llm_relay_stream_duration_seconds_count", outcome="done") == 2
    assert value(samples, "llm_relay_streams_open") == 0
    assert value(samples, "llm_relay_readers_open") == 0
    assert value(samples, "llm_relay_client_disconnects_total", framing="sse") == 0
    assert not [key for key in samples if key[0] == "llm_relay_upstream_errors_total"]


@pytest.mark.parametrize(
    ("behavior", "type_", "status"),
    [
        (Behavior(fault="status", status=500), "upstream_error", "500"),
        (Behavior(fault="status", status=429, retry_after="7"), "upstream_rate_limited", "429"),
        (Behavior(tokens=["a", "b", "c"], fault="malformed", fault_after=1), "upstream_protocol_error", "200"),
    ],
    ids=["500", "429", "malformed-mid-stream"],
)
async def test_upstream_errors_by_type_and_status(
    fake_upstream: FakeUpstream,
    relay: Callable[..., Awaitable[str]],
    http: aiohttp.ClientSession,
    behavior: Behavior,
    type_: str,
    status: str,
) -> None:
    fake_upstream.behavior = behavior
    base = await relay()
    async with http.get(f"{base}/api/chat", params={"prompt": "x"}) as response:
        await response.read()
    samples = await scrape_until(
        http, f"{base}/metrics", lambda s: value(s, "llm_relay_upstream_errors_total", type=type_, status=status) == 1
    )
    assert value(samples, "llm_relay_streams_ended_total", framing="sse", outcome="error") == 1
    assert value(samples, "llm_relay_readers_ended_total", framing="sse", outcome="error") == 1
    # An upstream failure is not a refusal of the client's request.
    assert not [key for key in samples if key[0] == "llm_relay_requests_refused_total"]


async def test_an_unreachable_upstream_is_an_upstream_error_without_a_status(
    serve_standalone: ServeStandalone, http: aiohttp.ClientSession
) -> None:
    upstream = FakeUpstream()
    await upstream.start()
    await upstream.close()  # nothing listens there any more
    base = await serve_standalone(upstream_config(upstream))
    async with http.get(f"{base}/api/chat", params={"prompt": "x"}) as response:
        assert response.status == 502
    await scrape_until(
        http,
        f"{base}/metrics",
        lambda s: value(s, "llm_relay_upstream_errors_total", type="upstream_unavailable", status="none") == 1,
    )


async def test_a_client_leaving_is_a_disconnect_and_the_upstream_close_is_timed(
    fake_upstream: FakeUpstream, relay: Callable[..., Awaitable[str]], http: aiohttp.ClientSession
) -> None:
    fake_upstream.behavior = Behavior(tokens=["x"] * 10_000, delay=0.01)
    base = await relay()
    response = await http.get(f"{base}/api/chat", params={"prompt": "x"}, headers=SSE)
    await response.content.readuntil(b"\n\n")
    await response.content.readuntil(b"\n\n")
    response.close()  # the client goes away mid-stream
    samples = await scrape_until(
        http, f"{base}/metrics", lambda s: value(s, "llm_relay_upstream_close_seconds_count", outcome="abandoned")
    )
    assert value(samples, "llm_relay_client_disconnects_total", framing="sse") == 1
    assert value(samples, "llm_relay_readers_ended_total", framing="sse", outcome="disconnected") == 1
    assert value(samples, "llm_relay_streams_ended_total", framing="sse", outcome="abandoned") == 1
    assert value(samples, "llm_relay_upstream_close_seconds_count", outcome="abandoned") == 1
    # Closing is the abort callbacks' work in the disconnect's own loop turn: far under the largest bucket.
    assert value(samples, "llm_relay_upstream_close_seconds_bucket", outcome="abandoned", le="5.0") == 1
    assert value(samples, "llm_relay_streams_open") == 0


async def test_a_client_that_stops_reading_is_a_slow_client_disconnect(
    fake_upstream: FakeUpstream, relay: Callable[..., Awaitable[str]], http: aiohttp.ClientSession
) -> None:
    # Far more than a 32 KiB send buffer and the transport's buffer hold: writes to a client that reads nothing wait.
    fake_upstream.behavior = Behavior(tokens=["x" * 16_000] * 1_000)
    base = await relay(write_timeout=0.3, send_buffer=32_768)
    host, port = base.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET /api/chat?prompt=x&format=ndjson HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    await writer.drain()  # ... and then reads nothing
    try:
        samples = await scrape_until(
            http, f"{base}/metrics", lambda s: value(s, "llm_relay_client_disconnects_total", framing="ndjson")
        )
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):  # the relay aborted the connection
            await writer.wait_closed()
    assert value(samples, "llm_relay_readers_ended_total", framing="ndjson", outcome="slow_client") == 1
    assert value(samples, "llm_relay_bytes_sent_total", framing="ndjson") > 0


async def test_a_stop_is_an_outcome_and_its_upstream_close_is_timed(
    fake_upstream: FakeUpstream, relay: Callable[..., Awaitable[str]], http: aiohttp.ClientSession
) -> None:
    fake_upstream.behavior = Behavior(tokens=["x"] * 10_000, delay=0.01)
    base = await relay()
    async with http.get(f"{base}/api/chat", params={"prompt": "x"}, headers=NDJSON) as response:
        await response.content.readline()
        async with http.delete(f"{base}/api/streams/{response.headers['X-Stream-Id']}") as stopped:
            assert stopped.status == 204
        await response.read()
    samples = await scrape_until(
        http, f"{base}/metrics", lambda s: value(s, "llm_relay_upstream_close_seconds_count", outcome="stopped")
    )
    assert value(samples, "llm_relay_streams_ended_total", framing="ndjson", outcome="stopped") == 1
    # The reader got the in-band "stopped" error: its client did not leave.
    assert value(samples, "llm_relay_readers_ended_total", framing="ndjson", outcome="error") == 1
    assert value(samples, "llm_relay_client_disconnects_total", framing="ndjson") == 0


async def test_shutdown_is_an_outcome(fake_upstream: FakeUpstream, http: aiohttp.ClientSession) -> None:
    fake_upstream.behavior = Behavior(tokens=["x"] * 10_000, delay=0.01)
    registry = CollectorRegistry()
    host = web.Application()
    host.add_subapp("/api", create_relay_app(upstream_config(fake_upstream), metrics=RelayMetrics(registry)))
    runner = web.AppRunner(host, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    response = await http.get(f"http://127.0.0.1:{port}/api/chat", params={"prompt": "x"}, headers=NDJSON)
    await response.content.readline()
    await runner.cleanup()  # the server goes down with the stream running
    body = await response.read()
    assert b'"server_shutdown"' in body

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert sample("llm_relay_streams_ended_total", framing="ndjson", outcome="shutdown") == 1
    assert sample("llm_relay_readers_ended_total", framing="ndjson", outcome="shutdown") == 1
    assert sample("llm_relay_upstream_close_seconds_count", outcome="shutdown") == 1
    assert sample("llm_relay_streams_open") == 0
    assert sample("llm_relay_readers_open") == 0


async def test_a_first_token_timeout_ends_the_stream_as_timeout(
    fake_upstream: FakeUpstream, relay: Callable[..., Awaitable[str]], http: aiohttp.ClientSession
) -> None:
    fake_upstream.behavior = Behavior(first_delay=30)
    base = await relay(first_token_timeout=0.2)
    async with http.get(f"{base}/api/chat", params={"prompt": "x"}) as response:
        assert response.status == 504
    samples = await scrape_until(
        http, f"{base}/metrics", lambda s: value(s, "llm_relay_streams_ended_total", framing="sse", outcome="timeout")
    )
    assert value(samples, "llm_relay_stream_duration_seconds_count", outcome="timeout") == 1
    assert value(samples, "llm_relay_time_to_first_token_seconds_count") == 0


async def test_refusals_by_type_and_status(relay: Callable[..., Awaitable[str]], http: aiohttp.ClientSession) -> None:
    base = await relay(limits_enabled=True, rate="1/m", burst=1)
    async with http.get(f"{base}/api/chat", params={"prompt": "x"}) as response:
        assert response.status == 200
        await response.read()
    async with http.get(f"{base}/api/chat", params={"prompt": "x"}) as response:
        assert response.status == 429
    async with http.post(f"{base}/api/chat", data=b"{}", headers={"Content-Type": "text/plain"}) as response:
        assert response.status == 429  # admitted first: the rate limit refuses it before its body is looked at
    async with http.get(f"{base}/api/streams/nope") as response:
        assert response.status == 404
    samples = await scrape(http, f"{base}/metrics")
    assert value(samples, "llm_relay_requests_refused_total", type="rate_limited", status="429") == 2
    assert value(samples, "llm_relay_requests_refused_total", type="resume_unavailable", status="404") == 1
    assert value(samples, "llm_relay_streams_started_total", framing="sse") == 1


async def test_a_resume_is_counted_and_the_retained_log_is_measured(
    relay: Callable[..., Awaitable[str]], http: aiohttp.ClientSession
) -> None:
    base = await relay(resume_grace=5)
    async with http.get(f"{base}/api/chat", params={"prompt": "x", "resume": "1"}, headers=SSE) as response:
        stream_id = response.headers["X-Stream-Id"]
        await response.read()
    async with http.get(f"{base}/api/streams/{stream_id}", params={"after": "2"}, headers=NDJSON) as response:
        assert response.status == 200
        tail = await response.read()
    samples = await scrape_until(
        http, f"{base}/metrics", lambda s: value(s, "llm_relay_readers_ended_total", framing="ndjson", outcome="done")
    )
    assert value(samples, "llm_relay_resumes_total", framing="ndjson") == 1
    assert value(samples, "llm_relay_resumes_total", framing="sse") == 0
    assert value(samples, "llm_relay_bytes_sent_total", framing="ndjson") == len(tail)
    assert value(samples, "llm_relay_streams_started_total", framing="sse") == 1  # a resume starts nothing
    # The ended stream's log is retained for resuming: five events (four tokens and the end), estimated.
    assert value(samples, "llm_relay_streams_retained") == 1
    assert value(samples, "llm_relay_stream_log_bytes") >= 5 * 100


async def test_a_metrics_port_of_its_own_and_none_on_the_public_listener(
    fake_upstream: FakeUpstream, serve_standalone: ServeStandalone, http: aiohttp.ClientSession
) -> None:
    port = free_port()
    base = await serve_standalone(upstream_config(fake_upstream, metrics_port=port))
    async with http.get(f"{base}/api/chat", params={"prompt": "x"}) as response:
        await response.read()
    async with http.get(f"{base}/metrics") as response:
        assert response.status == 404
    await scrape_until(
        http,
        f"http://127.0.0.1:{port}/metrics",
        lambda s: value(s, "llm_relay_streams_ended_total", framing="sse", outcome="done") == 1,
    )


async def test_metrics_off(serve_standalone: ServeStandalone, http: aiohttp.ClientSession) -> None:
    base = await serve_standalone(Config(provider="demo", demo_delay=0, limits_enabled=False, metrics=False))
    async with http.get(f"{base}/metrics") as response:
        assert response.status == 404


async def test_the_public_metrics_answer_only_known_host_names(
    serve_standalone: ServeStandalone, http: aiohttp.ClientSession
) -> None:
    base = await serve_standalone(Config(provider="demo", limits_enabled=False))
    async with http.get(f"{base}/metrics", headers={"Host": "attacker.example"}) as response:
        assert response.status == 421
        assert (await response.json())["error"]["type"] == "misdirected_request"


async def test_an_embedding_app_has_no_metrics_unless_it_asks(serve: ServeApp, http: aiohttp.ClientSession) -> None:
    config = Config(provider="demo", demo_delay=0, limits_enabled=False, heartbeat=0)
    host = web.Application()
    host.add_subapp("/api", create_relay_app(config))
    base = await serve(host)
    async with http.get(f"{base}/metrics") as response:
        assert response.status == 404

    registry = CollectorRegistry()
    metrics = RelayMetrics(registry)
    asking = web.Application()
    asking.add_subapp("/relay", create_relay_app(config, metrics=metrics))
    asking.router.add_get("/metrics", metrics.handle)
    base = await serve(asking)
    async with http.get(f"{base}/relay/chat", params={"prompt": "hi"}) as response:
        await response.read()
    await scrape_until(
        http, f"{base}/metrics", lambda s: value(s, "llm_relay_streams_ended_total", framing="sse", outcome="done") == 1
    )
    assert registry.get_sample_value("llm_relay_streams_started_total", {"framing": "sse"}) == 1


async def _serving(http: aiohttp.ClientSession, base: str, log: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            async with http.get(f"{base}/healthz") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        assert time.monotonic() < deadline, _tail(log)
        await asyncio.sleep(0.1)


def _tail(log: Path) -> str:
    return log.read_text()[-2000:]


def _made_dirs(tmp: Path) -> list[Path]:
    return list(tmp.glob("llm-relay-metrics-*"))


def _workers(arbiter: int) -> list[int]:
    """The arbiter's child processes: its workers (Linux's /proc children list)."""
    children = Path(f"/proc/{arbiter}/task/{arbiter}/children").read_text().split()
    return [int(pid) for pid in children]


async def test_gunicorn_aggregates_without_being_told_where(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """No PROMETHEUS_MULTIPROC_DIR in the environment: server.gunicorn makes one for its workers, so a stream still
    counts after every worker that could have counted it is gone; the directory goes when gunicorn exits."""
    pytest.importorskip("gunicorn", reason="gunicorn is in the test extra: pip install -e '.[test]'")
    port = free_port()
    tmp = tmp_path / "tmp"  # where gunicorn's processes make temporary files and directories
    tmp.mkdir()
    env = clean_env(LLM_RELAY_LIMITS="false", LLM_RELAY_PROVIDER="demo", LLM_RELAY_DEMO_DELAY="0", TMPDIR=str(tmp))
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = tmp_path / "gunicorn.log"
    proc = start_gunicorn(port, log, env, "--workers", "2")
    base = f"http://127.0.0.1:{port}"
    try:
        await _serving(http, base, log)
        workers = _workers(proc.pid)
        assert len(workers) == 2, _tail(log)
        assert len(_made_dirs(tmp)) == 1, _tail(log)
        async with http.get(f"{base}/api/chat", params={"prompt": "hi"}) as response:
            await response.read()
        await scrape_until(http, f"{base}/metrics", lambda s: value(s, "llm_relay_readers_ended_total",
                                                                    framing="sse", outcome="done"))  # fmt: skip
        for worker in workers:
            os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while set(_workers(proc.pid)) & set(workers) or len(_workers(proc.pid)) < 2:
            assert time.monotonic() < deadline, _tail(log)
            await asyncio.sleep(0.1)
        async with aiohttp.ClientSession() as fresh:  # the old connection went with its worker
            await _serving(fresh, base, log)
            samples = await scrape(fresh, f"{base}/metrics")
        assert value(samples, "llm_relay_streams_started_total", framing="sse") == 1
        assert value(samples, "llm_relay_streams_open") == 0
    finally:
        await asyncio.to_thread(stop_gunicorn, proc)
    assert _made_dirs(tmp) == []


async def test_gunicorn_workers_are_aggregated(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """Two workers, many streams on separate connections: every scrape, whichever worker answers it, counts all
    of them (prometheus-client's multiprocess mode, set up by server.gunicorn)."""
    pytest.importorskip("gunicorn", reason="gunicorn is in the test extra: pip install -e '.[test]'")
    port = free_port()
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_1.db").write_bytes(b"stale")  # left by an earlier run: wiped at startup
    env = clean_env(LLM_RELAY_LIMITS="false", LLM_RELAY_PROVIDER="demo", LLM_RELAY_DEMO_DELAY="0.01",
                    PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))  # fmt: skip
    log = tmp_path / "gunicorn.log"
    proc = start_gunicorn(port, log, env, "--workers", "2")
    base = f"http://127.0.0.1:{port}"
    try:
        await _serving(http, base, log)
        streams = 24

        async def one() -> None:
            # A connection of its own each, so the kernel spreads them over both workers' accept loops.
            async with (
                aiohttp.ClientSession() as own,
                own.get(f"{base}/api/chat", params={"prompt": "hi"}, headers={"Connection": "close"}) as response,
            ):
                assert response.status == 200
                await response.read()

        await asyncio.gather(*(one() for _ in range(streams)))
        served = sorted(int(path.stem.partition("_")[2]) for path in metrics_dir.glob("counter_*.db"))
        assert served, _tail(log)
        assert 1 not in served  # the stale file was wiped at startup

        def all_streams_counted(samples: Samples) -> bool:
            return value(samples, "llm_relay_readers_ended_total", framing="sse", outcome="done") == streams

        for _ in range(4):
            async with aiohttp.ClientSession() as own:  # a new connection each: any worker may answer
                samples = await scrape_until(own, f"{base}/metrics", all_streams_counted)
            assert value(samples, "llm_relay_streams_started_total", framing="sse") == streams
            assert value(samples, "llm_relay_streams_ended_total", framing="sse", outcome="done") == streams
            assert value(samples, "llm_relay_streams_open") == 0
        # Whichever worker served the streams, kill it: the scrapes now come from processes that served none of
        # them (the other worker, and the one gunicorn starts instead), and still count every stream.
        os.kill(served[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:
            async with aiohttp.ClientSession() as own:
                try:
                    samples = await scrape(own, f"{base}/metrics")
                    break
                except aiohttp.ClientError:
                    assert time.monotonic() < deadline, _tail(log)
                    await asyncio.sleep(0.1)
        assert all_streams_counted(samples)
        assert value(samples, "llm_relay_streams_started_total", framing="sse") == streams
        assert value(samples, "llm_relay_readers_open") == 0
    finally:
        await asyncio.to_thread(stop_gunicorn, proc)
    # The directory was the environment's: the relay wiped its stale files but leaves the directory itself.
    assert metrics_dir.is_dir()


def test_a_metrics_port_in_use_is_a_startup_error_that_names_it() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "server", "--port", str(free_port()), "--metrics-port", str(port),
             "--provider", "demo"],
            cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == (
        f"llm-relay: error: cannot listen on 127.0.0.1:{port} (--metrics-port): Address already in use"
    )
    assert "Traceback" not in done.stderr


async def test_token_budgets_reserved_charged_refunded_and_exhausted(
    relay: Callable[..., Awaitable[str]], http: aiohttp.ClientSession
) -> None:
    base = await relay(tokens_per_minute=30)
    ask = {"prompt": "x", "max_tokens": 20}  # reserves its prompt's estimate and 20 for the reply: fits 30 once
    async with http.post(f"{base}/api/chat", json=ask, headers=NDJSON) as response:
        assert response.status == 200
        await response.read()
    async with http.post(f"{base}/api/chat", json=ask, headers=NDJSON) as refused:
        assert refused.status == 429  # 30 less the 11 charged, refilled at half a token a second: too little
    samples = await scrape_until(
        http, f"{base}/metrics", lambda s: value(s, "llm_relay_budget_tokens_total", kind="charged")
    )
    reserved = value(samples, "llm_relay_budget_tokens_total", kind="reserved")
    charged = value(samples, "llm_relay_budget_tokens_total", kind="charged")
    refunded = value(samples, "llm_relay_budget_tokens_total", kind="refunded")
    assert charged == 11  # the usage the fake upstream reports: 7 prompt tokens and 4 completion tokens
    assert reserved > charged
    assert refunded == reserved - charged
    assert value(samples, "llm_relay_budget_tokens_total", kind="overrun") == 0
    assert value(samples, "llm_relay_budget_exhausted_total", budget="minute") == 1
    assert value(samples, "llm_relay_budget_exhausted_total", budget="day") == 0
