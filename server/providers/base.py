from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Sequence
from contextvars import ContextVar
from typing import Protocol

from ..chat_request import ChatRequest
from ..events import Event


class Provider(Protocol):
    """A source of chat replies.

    `stream` yields batches: every event that became available at once (one network read from an upstream can
    hold many chunks), so that the relay writes them in one go. The last batch ends with a terminal event
    (`Done` or `Error`), or the generator raises a `RelayError`. Closing the generator early must release the
    upstream at once: the relay closes it the moment a client leaves.
    """

    name: str

    def stream(self, request: ChatRequest) -> AsyncGenerator[Sequence[Event], None]: ...

    async def aclose(self) -> None: ...


# A provider may register synchronous callbacks that release its upstream at once (close the socket) for the
# stream it is serving. The relay calls them from the disconnect callback itself, before the stream's
# cancellation has worked its way through a busy event loop, so the upstream learns within the same loop turn.
_abort_callbacks: ContextVar[list[Callable[[], None]] | None] = ContextVar("llm_relay_abort", default=None)


def on_abort(callback: Callable[[], None]) -> None:
    """Register `callback` to run (once, synchronously) if the client leaves; a no-op outside a relayed stream."""
    callbacks = _abort_callbacks.get()
    if callbacks is not None:
        callbacks.append(callback)


def collect_aborts(callbacks: list[Callable[[], None]]) -> None:
    """Make `callbacks` the list `on_abort` appends to, in the current context (a stream's own task, whose
    context ends with it), until `stop_collecting_aborts`."""
    _abort_callbacks.set(callbacks)


def stop_collecting_aborts() -> None:
    """The stream is over: `on_abort` in the rest of the task registers nothing."""
    _abort_callbacks.set(None)


class UpstreamReport:
    """What a provider reports of its upstream call, for the access log and metrics: the HTTP status it answered
    (None until it answered, or when it never did: unreachable, or a provider with no upstream)."""

    __slots__ = ("status",)

    def __init__(self) -> None:
        self.status: int | None = None


_upstream_report: ContextVar[UpstreamReport | None] = ContextVar("llm_relay_upstream_report", default=None)


def report_upstream_status(status: int) -> None:
    """The upstream answered with HTTP `status`; a no-op outside a relayed stream."""
    report = _upstream_report.get()
    if report is not None:
        report.status = status


def collect_upstream_report(report: UpstreamReport) -> None:
    """Make `report` the one `report_upstream_status` fills, in the current context (a stream's own task),
    until `stop_collecting_upstream_report`."""
    _upstream_report.set(report)


def stop_collecting_upstream_report() -> None:
    _upstream_report.set(None)
