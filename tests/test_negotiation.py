"""server/negotiation.py: ``Accept`` (RFC 9110 §12.5.1) and the ``format`` override → a framing name."""

from __future__ import annotations

import pytest

from server.errors import NotAcceptable, RequestError
from server.negotiation import choose_framing


@pytest.mark.parametrize(
    ("accept", "framing"),
    [
        # README: "A missing Accept, */* or text/* get SSE; application/* gets NDJSON".
        (None, "sse"),
        ("", "sse"),
        ("   ", "sse"),
        ("*/*", "sse"),
        ("text/*", "sse"),
        ("application/*", "ndjson"),
        ("text/event-stream", "sse"),
        ("application/x-ndjson", "ndjson"),
        # Case and whitespace (media types are case-insensitive, RFC 9110 §8.3.1; OWS around ',' and ';').
        ("TEXT/EVENT-STREAM", "sse"),
        ("Application/X-NDJSON", "ndjson"),
        ("  application/x-ndjson  ", "ndjson"),
        ("text/html ,  application/x-ndjson ; q=0.5", "ndjson"),
        ("application/x-ndjson;Q=0.9, text/event-stream;q=0.1", "ndjson"),
        # q-values.
        ("text/event-stream;q=0.5, application/x-ndjson", "ndjson"),
        ("text/event-stream, application/x-ndjson;q=0.5", "sse"),
        ("application/x-ndjson;q=0.5, text/event-stream;q=0.5", "sse"),  # a tie goes to SSE
        ("application/x-ndjson;q=1.0, text/event-stream;q=0.999", "ndjson"),
        ("application/x-ndjson;q=.2, */*;q=.1", "ndjson"),
        ("text/event-stream;charset=utf-8;q=0.3, application/x-ndjson;q=0.2", "sse"),
        ("*/*;q=0.1, application/x-ndjson", "ndjson"),
        ("*/*, application/x-ndjson;q=0.9", "sse"),
        # The most specific range decides a type's quality, even when a vaguer one has a higher q.
        ("text/event-stream;q=0.1, */*;q=1", "ndjson"),
        ("application/x-ndjson;q=0.2, application/*;q=1, text/*;q=0.5", "sse"),
        # q=0 means "not acceptable".
        ("text/event-stream;q=0, */*", "ndjson"),
        ("text/event-stream;q=0.000, application/*", "ndjson"),
        ("application/x-ndjson;q=0, */*", "sse"),
        ("text/*;q=0, */*", "ndjson"),
        # What browsers and tools send.
        ("text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8", "sse"),
        ("application/json, text/plain, */*", "sse"),
        ("text/event-stream, text/html", "sse"),
        # Garbage beside a valid range is skipped.
        ("garbage, application/x-ndjson", "ndjson"),
        (",,application/x-ndjson,,", "ndjson"),
        ("application/x-ndjson;q=abc, text/event-stream;q=0.1", "sse"),
    ],
    ids=lambda value: repr(value),
)
def test_accept(accept: str | None, framing: str) -> None:
    assert choose_framing(accept, None) == framing


@pytest.mark.parametrize(
    "accept",
    [
        "text/html",
        "application/json",
        "text/plain, application/json",
        "image/*",
        "garbage",
        "text/event-stream;q=0",
        "text/event-stream;q=0, application/x-ndjson;q=0",
        "*/*;q=0",
        "text/*;q=0, application/*;q=0",
        "text/event-stream;q=2",  # a q outside 0..1 is not a valid weight (RFC 9110 §12.4.2)
        "text/event-stream;q=-1",
        "text/event-stream;q=nan",
        "text/event-stream;q=",
        "text/event-streams",
        "text/event",
        "event-stream",
    ],
    ids=lambda value: repr(value),
)
def test_not_acceptable(accept: str) -> None:
    with pytest.raises(NotAcceptable) as info:
        choose_framing(accept, None)
    assert info.value.status == 406
    assert "text/event-stream" in info.value.message
    assert "application/x-ndjson" in info.value.message


@pytest.mark.parametrize(
    ("override", "accept", "framing"),
    [
        ("sse", None, "sse"),
        ("ndjson", None, "ndjson"),
        ("ndjson", "text/event-stream", "ndjson"),
        ("sse", "application/x-ndjson", "sse"),
        ("sse", "text/html", "sse"),  # the override wins even over an Accept that allows neither
        ("ndjson", "text/event-stream;q=0, application/x-ndjson;q=0", "ndjson"),
    ],
    ids=["sse", "ndjson", "ndjson-beats-accept", "sse-beats-accept", "beats-not-acceptable", "beats-q0"],
)
def test_format_override(override: str, accept: str | None, framing: str) -> None:
    assert choose_framing(accept, override) == framing


@pytest.mark.parametrize(
    "override",
    ["", "json", "SSE", "NDJSON", " sse", "sse ", "text/event-stream", "event-stream", "sse,ndjson"],
    ids=lambda value: repr(value),
)
def test_invalid_format_override(override: str) -> None:
    with pytest.raises(RequestError) as info:
        choose_framing("text/event-stream", override)
    assert type(info.value) is RequestError
    assert info.value.status == 400
    assert "sse" in info.value.message
    assert "ndjson" in info.value.message


def test_docstring_examples_run() -> None:
    import doctest

    import server.negotiation

    results = doctest.testmod(server.negotiation)
    assert results.attempted
    assert not results.failed
