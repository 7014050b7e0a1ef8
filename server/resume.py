"""Where a reconnecting client resumes: ``Last-Event-ID`` or ``?after=N``. Pure parsing, no IO.

An SSE event's id is ``<stream-id>/<seq>`` (see `server/framing.py`); a browser's ``EventSource`` sends the last
one it saw back as ``Last-Event-ID`` when it reconnects (WHATWG HTML §9.2.3). Any other client may name the stream
in the path (``GET /api/streams/{id}``) and the last event it holds with ``?after=N`` (NDJSON lines carry ``seq``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import RequestError, ResumeUnavailable

_STREAM_ID = re.compile(r"[0-9a-f]{32}")
_SEQ = re.compile(r"0|[1-9][0-9]{0,17}")


@dataclass(frozen=True, slots=True)
class ResumePoint:
    stream_id: str
    after: int


def is_stream_id(text: str) -> bool:
    return _STREAM_ID.fullmatch(text) is not None


def parse_last_event_id(value: str) -> ResumePoint:
    """``<stream-id>/<seq>``; anything else names no stream this relay made (`ResumeUnavailable`).

    >>> parse_last_event_id("0123456789abcdef0123456789abcdef/7")
    ResumePoint(stream_id='0123456789abcdef0123456789abcdef', after=7)
    """
    stream_id, slash, seq = value.strip(" ").partition("/")
    if not slash or not is_stream_id(stream_id) or _SEQ.fullmatch(seq) is None:
        raise ResumeUnavailable("Last-Event-ID does not name a stream of this relay")
    return ResumePoint(stream_id, int(seq))


def parse_after(value: str | None) -> int | None:
    """``?after=N``: the last event the client holds (0: from the start); None when absent."""
    if value is None:
        return None
    if _SEQ.fullmatch(value) is None:
        raise RequestError("after must be a whole number of events (0 for the start)")
    return int(value)
