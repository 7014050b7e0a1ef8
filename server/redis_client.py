"""One way to open a Redis client for the limiter, the token budgets and the stream store.

Every user wants the same client: no retries inside it (a retry would spend a request's time; each caller's
fallback decides what an outage means), bounded socket waits, and a startup error that never quotes the URL
(redis-py's message can quote part of it, and a password with it).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from .config import ConfigError

if TYPE_CHECKING:
    from redis.asyncio import Redis

BAD_URL = (
    "--redis-url is not a Redis URL: expected redis://[[user]:password@]host[:port][/db], rediss://... "
    "or unix:///path, with '@', ':' and '/' in a password percent-encoded"
)


def redis_client(url: str, *, timeout: float, connect_timeout: float | None = None, needed_by: str) -> Redis:
    """A client on a new connection pool for `url` (no connection is made until the first command); `needed_by`
    names the option that wants it, for the error when the redis package is missing."""
    try:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
    except ImportError:  # pragma: no cover - depends on the installation
        raise ConfigError(f"{needed_by} needs the redis package: pip install '.[redis]' from the project") from None
    try:
        return Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout if connect_timeout is None else connect_timeout,
            retry=Retry(NoBackoff(), 0),
        )
    except ValueError:
        raise ConfigError(BAD_URL) from None


class RedisOutage:
    """Whether a Redis user considers Redis down: from a failure for `retry_interval` seconds (its fallback decides
    meanwhile), with one warning when an outage starts and one when Redis answers again."""

    def __init__(
        self, clock: Callable[[], float], retry_interval: float, log: logging.Logger, down: str, back: str
    ) -> None:
        self._clock = clock
        self._retry_interval = retry_interval
        self._log = log
        self._down = down  # what happens meanwhile, e.g. "refusing requests (503) until it answers again"
        self._back = back
        self._down_until = -math.inf

    @property
    def available(self) -> bool:
        return self._clock() >= self._down_until

    def went_down(self, exc: BaseException) -> None:
        if self.available:
            self._log.warning("Redis is unreachable (%s: %s): %s", type(exc).__name__, exc, self._down)
        self._down_until = self._clock() + self._retry_interval

    def came_back(self) -> None:
        if self._down_until != -math.inf:
            self._log.warning("Redis answers again: %s", self._back)
            self._down_until = -math.inf
