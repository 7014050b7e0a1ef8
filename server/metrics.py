"""Prometheus metrics (prometheus-client): an observer of streams, readers and refusals, and ``GET /metrics``.

    core ──stream_started / stream_ended / stream_closed / reader_* / request_refused──▶ RelayMetrics
                                                                                         │ counters, gauges,
    GET /metrics ──▶ RelayMetrics.handle ──▶ text exposition ◀──────────────────────────┘ histograms

Nothing here runs per token: a generation counts its events and a reader its bytes as plain integers, and
`RelayMetrics` adds them to the counters once, when the stream or the reader ends. The memory the stream logs
hold is sampled (at each scrape, and every `SAMPLE_INTERVAL` seconds under several processes).

**Several processes** (gunicorn workers): prometheus-client's multiprocess mode. With ``PROMETHEUS_MULTIPROC_DIR``
set before prometheus-client is first imported, every process writes its values to files in that directory and a
scrape of any worker aggregates all of them (`MultiProcessCollector`); gauges are summed over live processes
(``livesum``). ``server.gunicorn`` sets the directory up for its workers and marks a dead worker's files
(`mark_process_dead`). Histograms and counters keep the counts of workers that exited, as Prometheus expects.

``import server`` does not import this module (nor prometheus-client, whose multiprocess mode is decided when it
is first imported): `create_app` imports it and builds a `RelayMetrics` when ``--metrics`` is on (the default); an
application that embeds the relay (`server.setup`) gets none unless it passes one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from .budget_backends import BudgetStats
from .errors import UpstreamError
from .generation import Outcome
from .observe import StreamObserver, reported_usage

if TYPE_CHECKING:
    from .generation import Generation
    from .reader import Reader
    from .registry import StreamRegistry

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# How often each process refreshes the gauges it samples (the stream logs' memory) when several processes share
# the metrics: a scrape reaches one of them, and reads the others' last sample.
SAMPLE_INTERVAL = 1.0

# Seconds. Time to first token: a hosted model's usual 0.2-2 s, and the slow tail up to the first-token timeout.
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
DURATION_BUCKETS = (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# From the relay deciding to stop a generation (its last reader left, a stop, shutdown) to its upstream closed:
# the abort callbacks drop the socket in the same loop turn, so this is milliseconds unless the loop is saturated.
CLOSE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)

_CANCELLED = frozenset({Outcome.ABANDONED, Outcome.STOPPED, Outcome.SHUTDOWN})
_DISCONNECTED = frozenset({"disconnected", "slow_client"})

_Labelled = TypeVar("_Labelled", Counter, Gauge, Histogram)


def multiprocess_dir() -> str | None:
    """The multiprocess directory from the environment, if one is configured."""
    return os.environ.get(MULTIPROC_ENV) or None


class RelayMetrics(StreamObserver):
    """The relay's metrics, registered in `registry` (default: a registry of its own), and their exposition.

    An embedding application that already serves prometheus-client's default registry passes
    ``prometheus_client.REGISTRY``; otherwise route ``GET /metrics`` to `handle`.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, namespace: str = "llm_relay") -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._streams: StreamRegistry | None = None
        self._budgets: BudgetStats | None = None
        self._budgets_seen = BudgetStats()  # what the budget counters were last sampled at
        # The framing of the request that started each running generation: its end is counted under it.
        self._framings: dict[str, str] = {}
        # Each labelled metric's children by label values (see `_child`).
        self._children: dict[tuple[object, tuple[str, ...]], Any] = {}
        ns, reg = namespace, self.registry
        self.streams_started = Counter(
            "streams_started", "Generations started, by the framing of the request that started them",
            ["framing"], namespace=ns, registry=reg,
        )  # fmt: skip
        self.streams_ended = Counter(
            "streams_ended", "Generations ended, by framing and outcome (done, error, timeout, stopped, abandoned, "
            "shutdown)", ["framing", "outcome"], namespace=ns, registry=reg,
        )  # fmt: skip
        self.streams_open = Gauge(
            "streams_open", "Generations running now", namespace=ns, registry=reg, multiprocess_mode="livesum"
        )
        self.readers_open = Gauge(
            "readers_open", "Client connections reading a stream now", namespace=ns, registry=reg,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.readers_ended = Counter(
            "readers_ended", "Client connections that read a stream, by framing and outcome (done, error, "
            "disconnected, slow_client, shutdown, behind)", ["framing", "outcome"], namespace=ns, registry=reg,
        )  # fmt: skip
        self.resumes = Counter(
            "resumes", "Readers that joined an existing stream (Last-Event-ID, GET /api/streams/{id})",
            ["framing"], namespace=ns, registry=reg,
        )  # fmt: skip
        self.disconnects = Counter(
            "client_disconnects", "Readers whose client went away or stopped reading before the end of the stream",
            ["framing"], namespace=ns, registry=reg,
        )  # fmt: skip
        self.ttft = Histogram(
            "time_to_first_token_seconds", "From a generation's start to its first event from the provider",
            namespace=ns, registry=reg, buckets=TTFT_BUCKETS,
        )  # fmt: skip
        self.duration = Histogram(
            "stream_duration_seconds", "From a generation's start to its end, by outcome",
            ["outcome"], namespace=ns, registry=reg, buckets=DURATION_BUCKETS,
        )  # fmt: skip
        self.upstream_close = Histogram(
            "upstream_close_seconds", "From the relay cancelling a generation (last reader gone, stop, shutdown) "
            "to its upstream request closed", ["outcome"], namespace=ns, registry=reg, buckets=CLOSE_BUCKETS,
        )  # fmt: skip
        self.events = Counter(
            "stream_events", "Events (text, reasoning, tool-call and refusal deltas; not the end) generated",
            ["framing"], namespace=ns, registry=reg,
        )  # fmt: skip
        self.usage_tokens = Counter(
            "usage_tokens", "Tokens the upstream reported using (its usage: prompt, completion)",
            ["kind"], namespace=ns, registry=reg,
        )  # fmt: skip
        self.bytes_sent = Counter(
            "bytes_sent", "Bytes of stream bodies written to clients", ["framing"], namespace=ns, registry=reg
        )
        self.refused = Counter(
            "requests_refused", "Requests refused before any stream, by error type and status (rate_limited, "
            "unauthorized, invalid_request, ...)", ["type", "status"], namespace=ns, registry=reg,
        )  # fmt: skip
        self.upstream_errors = Counter(
            "upstream_errors", "Generations ended by an upstream failure, by error type and the upstream's HTTP "
            "status (none: it never answered)", ["type", "status"], namespace=ns, registry=reg,
        )  # fmt: skip
        self.log_bytes = Gauge(
            "stream_log_bytes", "Estimated bytes held by the logs of running and retained (resumable) streams",
            namespace=ns, registry=reg, multiprocess_mode="livesum",
        )  # fmt: skip
        self.retained = Gauge(
            "streams_retained", "Streams whose log is kept for resuming (running and recently ended)",
            namespace=ns, registry=reg, multiprocess_mode="livesum",
        )  # fmt: skip
        self.budget_tokens = Counter(
            "budget_tokens", "Tokens of the token budgets (--tokens-per-minute/-day): reserved at admission, charged "
            "at the end, refunded (reserved beyond the charge), overrun (charged beyond the reservation)", ["kind"],
            namespace=ns, registry=reg,
        )  # fmt: skip
        self.budget_exhausted = Counter(
            "budget_exhausted", "Requests refused because a token budget was spent, by budget (minute, day)",
            ["budget"], namespace=ns, registry=reg,
        )  # fmt: skip

    def _child(self, metric: _Labelled, *values: str) -> _Labelled:
        """``metric.labels(*values)``, looked up once. prometheus-client validates the values and takes a lock at
        every ``labels()`` call (about a microsecond, eight times per stream); the child it returns is the same
        object each time and lives as long as the metric (the relay never calls ``remove()`` or ``clear()``,
        after which a kept child would count unexported), so keeping it here changes nothing but that cost.
        Label values are few: framings, outcomes, the relay's error types, HTTP statuses."""
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return cast(_Labelled, child)

    # -- the observer -------------------------------------------------------------------------------------------

    def stream_started(self, generation: Generation, framing: str) -> None:
        self._framings[generation.id] = framing
        self._child(self.streams_started, framing).inc()
        self.streams_open.inc()

    def stream_ended(self, generation: Generation) -> None:
        framing = self._framings.pop(generation.id, "none")
        outcome = generation.outcome.value
        self._child(self.streams_ended, framing, outcome).inc()
        self.streams_open.dec()
        if generation.first_event_at is not None:
            self.ttft.observe(generation.first_event_at - generation.started_at)
        if generation.ended_at is not None:
            self._child(self.duration, outcome).observe(generation.ended_at - generation.started_at)
        # Every generation's log ends with its terminal event; the rest is what the provider generated.
        self._child(self.events, framing).inc(max(0, generation.log.last_seq - 1))
        usage = reported_usage(generation)
        if usage is not None:
            self._child(self.usage_tokens, "prompt").inc(usage.prompt_tokens)
            self._child(self.usage_tokens, "completion").inc(usage.completion_tokens)
        failure = generation.failure
        if isinstance(failure, UpstreamError):
            status = generation.upstream.status
            self._child(self.upstream_errors, failure.type, str(status) if status is not None else "none").inc()

    def stream_closed(self, generation: Generation, seconds: float) -> None:
        if generation.outcome in _CANCELLED:
            self._child(self.upstream_close, generation.outcome.value).observe(seconds)

    def reader_started(self, reader: Reader, resumed: bool) -> None:
        self.readers_open.inc()
        if resumed:
            self._child(self.resumes, reader.framing.name).inc()

    def reader_ended(self, reader: Reader, resumed: bool) -> None:
        framing = reader.framing.name
        self.readers_open.dec()
        self._child(self.readers_ended, framing, reader.outcome).inc()
        if reader.outcome in _DISCONNECTED:
            self._child(self.disconnects, framing).inc()
        if reader.bytes_written:
            self._child(self.bytes_sent, framing).inc(reader.bytes_written)

    def request_refused(self, error_type: str, status: int) -> None:
        self._child(self.refused, error_type, str(status)).inc()

    # -- sampled gauges and exposition --------------------------------------------------------------------------

    def watch(self, streams: StreamRegistry) -> None:
        """Sample `streams` (the memory of its logs, the streams it retains) for the gauges."""
        self._streams = streams

    def watch_budgets(self, stats: BudgetStats) -> None:
        """Count the token budgets' `stats` (counters kept by server/budget_backends.py) at every sample."""
        self._budgets = stats

    def sample(self) -> None:
        streams = self._streams
        if streams is not None:
            self.log_bytes.set(streams.total_bytes)
            self.retained.set(streams.retained)
        budgets = self._budgets
        if budgets is not None:
            # The budget keeps plain counters (no prometheus call on its path): added here by what they grew.
            seen = self._budgets_seen
            for kind in ("reserved", "charged", "refunded", "overrun"):
                grown = getattr(budgets, kind) - getattr(seen, kind)
                if grown > 0:
                    self._child(self.budget_tokens, kind).inc(grown)
            for budget, field in (("minute", "budget_exhausted"), ("day", "quota_exhausted")):
                grown = getattr(budgets, field) - getattr(seen, field)
                if grown > 0:
                    self._child(self.budget_exhausted, budget).inc(grown)
            self._budgets_seen = dataclasses.replace(budgets)

    def exposition(self) -> bytes:
        """The text exposition of every process's metrics (multiprocess mode) or of this registry's."""
        self.sample()
        if multiprocess_dir() is None:
            return generate_latest(self.registry)
        aggregate = CollectorRegistry()
        MultiProcessCollector(aggregate)  # type: ignore[no-untyped-call]
        return generate_latest(aggregate)

    async def handle(self, request: web.Request) -> web.Response:
        """``GET /metrics``: the Prometheus text exposition format."""
        # Reading every worker's files is disk work: off the event loop when there are several.
        body = self.exposition() if multiprocess_dir() is None else await asyncio.to_thread(self.exposition)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST, "Cache-Control": "no-store"})

    async def sampling(self, app: web.Application) -> AsyncIterator[None]:
        """A cleanup context: under several processes, refresh the sampled gauges every `SAMPLE_INTERVAL`."""
        if multiprocess_dir() is None:
            yield
            return
        task = asyncio.get_running_loop().create_task(self._sample_every(SAMPLE_INTERVAL))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _sample_every(self, interval: float) -> None:
        while True:
            self.sample()
            await asyncio.sleep(interval)


class MetricsListenerError(OSError):
    """The metrics listener (``--metrics-port``) could not listen: its address is the `strerror`, the cause is
    the socket's error."""


def metrics_app(metrics: RelayMetrics) -> web.Application:
    """An application serving only ``GET /metrics``: for a listener of its own (``--metrics-port``)."""
    app = web.Application()
    app.router.add_get("/metrics", metrics.handle, allow_head=False)
    return app


def serve_metrics(
    metrics: RelayMetrics, host: str, port: int
) -> Callable[[web.Application], contextlib.AbstractAsyncContextManager[None]]:
    """A cleanup context for the main app that serves `metrics_app` on `host`:`port` while the app runs.

    Under several processes each one listens on the port with SO_REUSEPORT: whichever the kernel hands a scrape
    to answers with the aggregate of all of them.
    """

    @contextlib.asynccontextmanager
    async def serving(app: web.Application) -> AsyncIterator[None]:
        runner = web.AppRunner(metrics_app(metrics), access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port, reuse_port=multiprocess_dir() is not None or None)
            try:
                await site.start()
            except OSError as exc:
                # Named as the metrics listener's: the startup error must not blame the public one.
                raise MetricsListenerError(exc.errno, f"{host}:{port} (--metrics-port)") from exc
            yield
        finally:
            await runner.cleanup()

    return serving


__all__ = ["MULTIPROC_ENV", "MetricsListenerError", "RelayMetrics", "metrics_app", "multiprocess_dir", "serve_metrics"]
