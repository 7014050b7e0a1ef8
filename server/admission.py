"""What the handlers need from admission control: `Limiter.admit(client) -> Admission`, and nothing more.

The arithmetic lives in `server/limits.py` (sans-IO); the backends (in process, Redis) implement `Limiter`.
`admit` raises `RateLimited` (429) or `Overloaded` (503), carrying ``Retry-After`` and the RateLimit header
fields, before anything is written; an `Admission` holds the client's stream slots until `release()`, which the
handler calls in every outcome.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol


class Admission(Protocol):
    @property
    def headers(self) -> Mapping[str, str]:
        """Header fields for the admitted response (RateLimit-Policy, RateLimit)."""
        ...

    async def release(self) -> None:
        """Give the stream slots back. Safe to call more than once."""
        ...


class Limiter(Protocol):
    async def admit(self, client: str) -> Admission: ...

    async def aclose(self) -> None: ...


class _Unlimited:
    headers: Mapping[str, str] = {}

    async def release(self) -> None:
        return None


class NoLimits:
    """Admits everything: for ``--limits off`` and for hosts that do their own admission control."""

    _admission = _Unlimited()

    async def admit(self, client: str) -> Admission:
        return self._admission

    async def aclose(self) -> None:
        return None
