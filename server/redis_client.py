"""One way to open a Redis client for the limiter, the token budgets and the stream store.

Every user wants the same client: no retries inside it (a retry would spend a request's time; each caller's
fallback decides what an outage means), bounded socket waits, and a startup error that never quotes the URL
(redis-py's message can quote part of it, and a password with it).
"""

from __future__ import annotations

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
