"""Failed authentication, counted per client address: a bounded table of token buckets, sans-IO.

With API keys configured, every request is a guess at a key until it is known to hold one. Each client address
gets a bucket of `AuthFailurePolicy.failures` failures, refilled at `AuthFailurePolicy.rate` per second (the
GCRA bucket of `server/limits.py`). Someone who mistypes a key a few times loses nothing; an address whose bucket
is empty is refused with 429 *before its key is looked at*, so that whoever keeps guessing learns nothing more
until the bucket has refilled by one.

    AuthFailurePolicy   how many failures, refilled how fast, for how many addresses at most
    AuthFailures        the table: retry_after(address, now) -> seconds or None; failed(address, now)

Nothing here reads a clock or touches a socket; `server/client_key.py` passes the time in.

Memory is bounded by `AuthFailurePolicy.max_addresses`. Addresses are kept in the order of their last failure; a
bucket that has refilled is worth nothing (an unknown address gets a full one), so it is forgotten when it is
next looked at, and the oldest full buckets make room for new addresses. Only when more addresses than the
table holds have all failed within one refill time is a bucket that is not full dropped: that address starts
again with a full bucket, which is no more than any new address gets.

    >>> table = AuthFailures(AuthFailurePolicy(failures=2, rate=0.5))
    >>> table.failed("ip:192.0.2.1", now=0.0); table.failed("ip:192.0.2.1", now=0.0)
    >>> table.retry_after("ip:192.0.2.1", now=1.0)
    1.0
    >>> table.retry_after("ip:192.0.2.1", now=2.0) is None, table.retry_after("ip:198.51.100.7", now=2.0) is None
    (True, True)
"""

from __future__ import annotations

from dataclasses import dataclass

from .limits import BucketTable, TokenBucket


@dataclass(frozen=True, slots=True)
class AuthFailurePolicy:
    """`failures` an address may make at once, forgiven at `rate` per second; 0 for either turns the limit off."""

    failures: int
    rate: float
    max_addresses: int = 10_000

    def __post_init__(self) -> None:
        if self.failures < 0 or not self.rate >= 0 or self.max_addresses < 1:
            raise ValueError("auth failure limits must not be negative, and the table holds at least one address")

    @property
    def enabled(self) -> bool:
        return self.failures > 0 and self.rate > 0


class AuthFailures:
    """The failure buckets of the addresses that failed lately, at most `policy.max_addresses` of them."""

    __slots__ = ("_empty", "_table", "policy")

    def __init__(self, policy: AuthFailurePolicy) -> None:
        if not policy.enabled:
            raise ValueError("an AuthFailures table needs a number of failures and a rate")
        self.policy = policy
        self._empty = TokenBucket(policy.rate, policy.failures)
        self._table = BucketTable(policy.max_addresses)

    def __len__(self) -> int:
        return len(self._table)

    @property
    def evicted_busy(self) -> int:
        """Buckets dropped before they were full: the table was too small for the traffic."""
        return self._table.evicted_busy

    def retry_after(self, address: str, now: float) -> float | None:
        """None if `address` may try a key at `now`; else the seconds until it may (never shorter than needed)."""
        tat = self._table.get(address)
        if tat is None:
            return None
        bucket = TokenBucket(self._empty.rate, self._empty.burst, tat)
        if bucket.is_full(now):
            self._table.forget(address)
            return None
        decision = bucket.acquire(now)
        return None if decision.allowed else decision.retry_after

    def failed(self, address: str, now: float) -> None:
        """Count one failure of `address` at `now`. Call it only after `retry_after` said the address may try."""
        tat = self._table.get(address)
        bucket = self._empty if tat is None else TokenBucket(self._empty.rate, self._empty.burst, tat)
        decision = bucket.acquire(now)
        if not decision.allowed:  # refused already: a failure it was not allowed to make costs nothing more
            return
        assert decision.bucket.tat is not None  # a token was taken
        self._table.store(address, decision.bucket.tat, now)


__all__ = ["AuthFailurePolicy", "AuthFailures"]
