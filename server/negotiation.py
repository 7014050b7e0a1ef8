"""Pick a framing from ``Accept`` (RFC 9110 §12.5.1) and the ``format`` query override. No IO.

``*/*``, ``text/*`` or a missing Accept choose SSE, the format a browser and ``curl -N`` can both show;
``application/x-ndjson`` (or ``application/*``) chooses NDJSON. ``format=sse|ndjson`` wins over Accept.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from .errors import NotAcceptable, RequestError

_MEDIA = {"text/event-stream": "sse", "application/x-ndjson": "ndjson"}
_PREFERENCE = ("sse", "ndjson")  # on equal quality


def _quality(params: list[str]) -> float:
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "q":
            try:
                q = float(value.strip())
            except ValueError:
                return 0.0
            return q if 0.0 <= q <= 1.0 else 0.0
    return 1.0


def _match_rank(range_: str, media: str) -> int:
    """How specifically `range_` matches `media`: 3 exact, 2 type/*, 1 */*, 0 no match."""
    if range_ == media:
        return 3
    kind, _, sub = range_.partition("/")
    if sub == "*" and media.startswith(kind + "/"):
        return 2
    return 1 if range_ == "*/*" else 0


def field_value(lines: Sequence[str]) -> str | None:
    """A field's value from its field lines: a list sent as several lines is the same list, comma-separated
    (RFC 9110 §5.3); None when the field is absent.

    >>> field_value(["text/html", "application/x-ndjson"]), field_value([])
    ('text/html, application/x-ndjson', None)
    """
    return ", ".join(lines) if lines else None


def choose_framing(accept: str | None, format_override: str | None) -> str:
    """The name of the framing to use, or raise `NotAcceptable` / `RequestError`."""
    if format_override is not None:
        if format_override not in _MEDIA.values():
            raise RequestError("format must be 'sse' or 'ndjson'")
        return format_override
    if accept is None:
        return "sse"
    return _from_accept(accept)


# Clients send the same few Accept values again and again; parsing one costs more than the rest of this module.
@lru_cache(maxsize=256)
def _from_accept(accept: str) -> str:
    if not accept.strip():
        return "sse"
    ranges: list[tuple[str, float]] = []
    for item in accept.split(","):
        media, *params = item.split(";")
        media = media.strip().lower()
        if media:
            ranges.append((media, _quality(params)))
    best: tuple[float, int, str] | None = None
    for media, name in _MEDIA.items():
        # The most specific matching range decides this media type's quality (RFC 9110 §12.5.1).
        rank, quality = max(((_match_rank(r, media), q) for r, q in ranges), default=(0, 0.0))
        if rank == 0 or quality <= 0.0:
            continue
        candidate = (quality, -_PREFERENCE.index(name), name)
        if best is None or candidate > best:
            best = candidate
    if best is None:
        raise NotAcceptable("this endpoint produces text/event-stream or application/x-ndjson")
    return best[2]
