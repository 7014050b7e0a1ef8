"""Token-bucket arithmetic (sans-IO)."""

from __future__ import annotations

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_rate(text: str) -> float:
    """Requests per second from ``N/s``, ``N/m`` or ``N/h``."""
    count, _, unit = text.strip().partition("/")
    try:
        value = float(count)
    except ValueError:
        raise ValueError(f"not a rate: {text!r} (use e.g. 2/s or 30/m)") from None
    if unit not in _UNITS or value < 0:
        raise ValueError(f"not a rate: {text!r} (use e.g. 2/s or 30/m)")
    return value / _UNITS[unit]
