"""server/observe.py: observers are told once per stream, reader and refusal, however many tokens flow; the
request id's rules."""

from __future__ import annotations

import doctest
import subprocess
import sys
from collections import Counter

import aiohttp
import pytest
from aiohttp import web

import server.observe
from server.app import create_relay_app
from server.generation import Generation
from server.metrics import RelayMetrics
from server.observe import Observers, StreamObserver, accepted_request_id, request_id_for
from server.reader import Reader

from .conftest import ServeApp, upstream_config
from .fake_upstream import Behavior, FakeUpstream
from .processes import ROOT, clean_env
from .scripted import wait_until


class CountingMetrics(RelayMetrics):
    """The real metrics, counting how often the core tells them something."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def stream_started(self, generation: Generation, framing: str) -> None:
        self.calls["stream_started"] += 1
        super().stream_started(generation, framing)

    def stream_ended(self, generation: Generation) -> None:
        self.calls["stream_ended"] += 1
        super().stream_ended(generation)

    def stream_closed(self, generation: Generation, seconds: float) -> None:
        self.calls["stream_closed"] += 1
        super().stream_closed(generation, seconds)

    def reader_started(self, reader: Reader, resumed: bool) -> None:
        self.calls["reader_started"] += 1
        super().reader_started(reader, resumed)

    def reader_ended(self, reader: Reader, resumed: bool) -> None:
        self.calls["reader_ended"] += 1
        super().reader_ended(reader, resumed)

    def request_refused(self, error_type: str, status: int) -> None:
        self.calls["request_refused"] += 1
        super().request_refused(error_type, status)


async def test_a_long_stream_tells_the_observer_a_handful_of_times(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    tokens = 2000
    fake_upstream.behavior = Behavior(tokens=["t"] * tokens)
    metrics = CountingMetrics()
    host = web.Application()  # an embedding app that asked for metrics
    host.add_subapp("/api", create_relay_app(upstream_config(fake_upstream), metrics=metrics))
    base = await serve(host)
    async with http.get(f"{base}/api/chat", params={"prompt": "x"}) as response:
        await response.read()
    await wait_until(lambda: metrics.calls["stream_closed"] == 1)
    assert metrics.calls == {
        "stream_started": 1, "reader_started": 1, "reader_ended": 1, "stream_ended": 1, "stream_closed": 1,
    }  # fmt: skip
    # ... and yet every token is counted.
    assert metrics.registry.get_sample_value("llm_relay_stream_events_total", {"framing": "sse"}) == tokens


def test_observers_are_told_in_order() -> None:
    told: list[tuple[str, str, int]] = []

    class Recording(StreamObserver):
        def __init__(self, name: str) -> None:
            self.name = name

        def request_refused(self, error_type: str, status: int) -> None:
            told.append((self.name, error_type, status))

    Observers([Recording("a"), StreamObserver(), Recording("b")]).request_refused("rate_limited", 429)
    assert told == [("a", "rate_limited", 429), ("b", "rate_limited", 429)]


@pytest.mark.parametrize(
    "header",
    ["0", "a" * 128, "4bf92f3577b34da6a3ce929d0e0e4736", "00-4bf92f35-00f067aa-01", "req:1/2+3=4@x_y.z"],
)
def test_well_formed_request_ids_are_kept(header: str) -> None:
    assert accepted_request_id(header) == header
    assert request_id_for(header) == header


@pytest.mark.parametrize("header", [None, "", "a" * 129, "a b", "a\tb", "a;b", "a,b", "<script>", "ü", "a\r\nb"])
def test_other_request_ids_are_replaced_by_fresh_ones(header: str | None) -> None:
    assert accepted_request_id(header) is None
    made = request_id_for(header)
    assert accepted_request_id(made) == made
    assert len(made) == 32
    assert made != request_id_for(header)


def test_docstring_examples() -> None:
    failures, tried = doctest.testmod(server.observe)
    assert (failures, tried > 0) == (0, True)


def test_importing_the_package_leaves_prometheus_client_unimported() -> None:
    """server.gunicorn sets PROMETHEUS_MULTIPROC_DIR in the arbiter after importing server; prometheus-client
    must not have been imported by then, or the workers it forks would not write the shared files."""
    probe = "import sys, server, server.gunicorn; print('prometheus_client' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "False"
