"""Admission arithmetic, sans-IO: the token bucket and the RateLimit header fields that describe it.

Nothing here reads a clock, awaits or touches a socket. Time is a number passed in (seconds from any fixed
origin), so every edge is tested without sleeping; the backends in `server/limiter.py` own clocks and state.

    LimitPolicy      what is limited: rate and burst per client, concurrent streams per client and in all
    TokenBucket      one client's bucket, a frozen value: acquire(now, cost) -> Decision (with the next bucket)
    Decision         allowed, retry_after, remaining, reset
    service_limit    remaining and reset from a bucket's debt (shared with the Redis backend's reply)

The bucket is kept as GCRA (the generic cell rate algorithm, ITU-T I.371): instead of a token count and a
timestamp it stores one number, the *theoretical arrival time* (TAT), the moment at which the bucket is full
again. A request costing ``c`` is admitted at ``now`` iff ``max(TAT, now) + c/rate - now <= burst/rate``. This is
the token bucket exactly (``tokens = burst - (TAT - now) * rate``), with one number of state per client and no
refill loop; the Redis backend runs the same rule in Lua.

The arithmetic is exact: rational numbers (`fractions.Fraction`, a few µs per decision), with the TAT kept as
one. So the guarantee holds without a rounding error's exception: over any schedule, the requests admitted in any
window of ``t`` seconds never exceed ``burst + rate * t``; `remaining` is exactly how many more would be admitted
now; ``retry_after`` is never shorter than the real wait. Results handed out as floats are rounded up
(`float_up`), never down, and the rate is read as the fraction it was configured as (`exact_rate`: ``1/m`` is
1/60, not the float nearest it).
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from dataclasses import dataclass
from fractions import Fraction

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_rate(text: str) -> float:
    """Requests per second from ``N/s``, ``N/m`` or ``N/h``.

    >>> parse_rate("2/s"), parse_rate("30/m"), parse_rate("0/s")
    (2.0, 0.5, 0.0)
    """
    count, _, unit = text.strip().partition("/")
    try:
        value = float(count)
    except ValueError:
        raise ValueError(f"not a rate: {text!r} (use e.g. 2/s or 30/m)") from None
    if unit not in _UNITS or not value >= 0 or math.isinf(value):
        raise ValueError(f"not a rate: {text!r} (use e.g. 2/s or 30/m)")
    return value / _UNITS[unit]


_RATE_DENOMINATOR = 1_000_000


@functools.lru_cache(maxsize=64)  # a server has a rate or two; finding the fraction costs more than a decision
def exact_rate(rate: float) -> Fraction:
    """`rate` as the fraction it was written as: ``parse_rate("1/m")`` is the float nearest 1/60, this is 1/60.

    A rate that no fraction with a denominator up to 10^6 matches to 12 significant digits is taken as it is.

    >>> exact_rate(parse_rate("1/m")), exact_rate(parse_rate("7/h")), exact_rate(2.5)
    (Fraction(1, 60), Fraction(7, 3600), Fraction(5, 2))
    """
    exact = Fraction(rate)
    near = exact.limit_denominator(_RATE_DENOMINATOR)
    return near if near and abs(near - exact) <= exact * Fraction(1, 10**12) else exact


@functools.lru_cache(maxsize=64)
def _interval(rate: float) -> Fraction:
    return 1 / exact_rate(rate)


def float_up(value: Fraction) -> float:
    """The smallest float not below `value`: a wait handed out is never shorter than the exact one."""
    result = float(value)
    if Fraction(result) < value:
        result = math.nextafter(result, math.inf)
    return result


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of `TokenBucket.acquire`.

    `retry_after`: seconds until this request would be admitted (0 when it was).
    `remaining`: whole requests the client may start right now (after this one, when it was admitted).
    `reset`: seconds until `remaining` grows by one; 0 when the bucket is full. This is the draft's *effective
    window* (draft-ietf-httpapi-ratelimit-headers-11 §4.1.2, ``t``): within it the client can start no more than
    `remaining` requests. When a request costing 1 is refused, `reset == retry_after`.
    `bucket`: the bucket after this decision (the same one when refused: a refused request costs nothing, so a
    client that keeps knocking does not push its own wait further out).
    """

    allowed: bool
    retry_after: float
    remaining: int
    reset: float
    bucket: TokenBucket


def service_limit(debt: Fraction, rate: Fraction, burst: int) -> tuple[int, float]:
    """(remaining, reset) of a bucket that is `debt` seconds from full, filling at `rate` up to `burst`."""
    tokens = burst - debt * rate if debt > 0 else Fraction(burst)
    remaining = max(0, math.floor(tokens))
    if tokens >= burst:
        return remaining, 0.0
    return remaining, float_up((remaining + 1 - tokens) / rate)


@dataclass(frozen=True, slots=True)
class TokenBucket:
    """A token bucket of `burst` tokens refilled at `rate` tokens per second, as a value.

    `tat` (theoretical arrival time) is when the bucket is full again, exact; None, the default, is a full bucket.

    >>> bucket = TokenBucket(rate=1.0, burst=2)
    >>> first = bucket.acquire(now=0.0)
    >>> first.allowed, first.remaining, first.reset
    (True, 1, 1.0)
    >>> second = first.bucket.acquire(now=0.0)
    >>> third = second.bucket.acquire(now=0.5)
    >>> third.allowed, third.retry_after, third.reset
    (False, 0.5, 0.5)
    >>> third.bucket.acquire(now=1.0).allowed
    True
    """

    rate: float
    burst: int
    tat: Fraction | None = None

    def __post_init__(self) -> None:
        if not self.rate > 0 or math.isinf(self.rate):
            raise ValueError(f"a token bucket needs a positive, finite rate, not {self.rate!r}")
        if self.burst < 1:
            raise ValueError(f"a token bucket holds at least one token, not {self.burst!r}")

    def acquire(self, now: float, cost: int = 1) -> Decision:
        """Take `cost` tokens at time `now` if the bucket holds them. ``cost=0`` only looks (always allowed).

        Times must not go backwards between the decisions of one bucket (use a monotonic clock); if they do, the
        bucket stays conservative: it admits nothing until it has caught up.
        """
        if cost < 0:
            raise ValueError(f"cost must not be negative, not {cost!r}")
        if cost > self.burst:
            raise ValueError(f"a request costing {cost} can never fit a bucket of {self.burst}")
        rate = exact_rate(self.rate)
        interval = _interval(self.rate)
        at = Fraction(now)
        start = at if self.tat is None or self.tat < at else self.tat
        new_tat = start + cost * interval
        # Admitted iff the debt after taking fits the bucket: new_tat - now <= burst / rate.
        overdraft = new_tat - at - self.burst * interval
        if overdraft > 0:
            remaining, reset = service_limit(start - at, rate, self.burst)
            return Decision(False, float_up(overdraft), remaining, reset, self)
        bucket = self if cost == 0 else TokenBucket(self.rate, self.burst, new_tat)
        remaining, reset = service_limit(new_tat - at, rate, self.burst)
        return Decision(True, 0.0, remaining, reset, bucket)

    def is_full(self, now: float) -> bool:
        """True when the bucket holds `burst` tokens at `now`: forgetting it then loses nothing."""
        return self.tat is None or self.tat <= now


# -- RateLimit header fields --------------------------------------------------------------------------------------
# draft-ietf-httpapi-ratelimit-headers-11: both fields are Structured Field Lists (RFC 9651 §3.1) of Items whose
# value is a String naming the policy. RateLimit-Policy parameters: q (quota, Integer), qu (quota unit, String),
# w (window, Integer seconds, non-zero). RateLimit parameters: r (available quota, Integer), t (effective window,
# Integer seconds). No pk (partition key): ours is the client's address or API key, which §6.1 says not to echo.

RATE_POLICY = "rate"
STREAMS_POLICY = "streams"
_SF_INTEGER_MAX = 999_999_999_999_999  # RFC 9651 §3.3.1: at most 15 digits


class BucketTable:
    """The TATs of many keys' buckets (`TokenBucket.tat`), at most `max_keys` of them, least recently stored first.

    A full bucket is worth nothing (a new key gets a full one), so as new keys arrive the oldest refilled buckets
    are forgotten, a couple per new key; only when more than `max_keys` keys have all been used within one refill
    time is a bucket that is not full dropped (counted in `evicted_busy`): that key starts again with a full
    bucket, no more than a new key gets, and memory stays bounded whatever a flood of keys does.

    >>> table = BucketTable(max_keys=2)
    >>> table.store("a", Fraction(5), now=0.0); table.store("b", Fraction(5), now=0.0)
    >>> table.store("c", Fraction(5), now=1.0)  # a and b not refilled yet: the oldest is dropped
    >>> sorted(table.keys()), table.evicted_busy
    (['b', 'c'], 1)
    """

    __slots__ = ("_tats", "evicted_busy", "max_keys")

    def __init__(self, max_keys: int) -> None:
        self.max_keys = max(1, max_keys)
        self._tats: OrderedDict[str, Fraction] = OrderedDict()
        self.evicted_busy = 0

    def __len__(self) -> int:
        return len(self._tats)

    def keys(self) -> list[str]:
        return list(self._tats)

    def get(self, key: str) -> Fraction | None:
        return self._tats.get(key)

    def forget(self, key: str) -> None:
        self._tats.pop(key, None)

    def store(self, key: str, tat: Fraction, now: float) -> None:
        tats = self._tats
        if key in tats:
            tats.move_to_end(key)
        else:
            for _ in range(2):  # forget a couple of refilled buckets per new key
                if not tats:
                    break
                oldest = next(iter(tats))
                if tats[oldest] > now:
                    break
                del tats[oldest]
            if len(tats) >= self.max_keys:
                tats.popitem(last=False)
                self.evicted_busy += 1
        tats[key] = tat


def _sf_int(value: int) -> str:
    return str(min(max(value, 0), _SF_INTEGER_MAX))


def _whole_seconds_up(seconds: float) -> int:
    # Like Retry-After (RFC 9110 §10.2.3, delay-seconds), rounded up so that the window never ends early.
    return math.ceil(seconds)


@dataclass(frozen=True, slots=True)
class LimitPolicy:
    """What admission control enforces; 0 turns a limit off.

    `rate`, `burst`: each client's token bucket (requests per second, and how many may come at once).
    `max_streams_per_client`: concurrent streams one client may hold (429 past it).
    `max_streams`: concurrent streams in all (503 past it). Not advertised in the header fields: the draft's
    §8.2 warns against telling untrusted parties the server's capacity.
    """

    rate: float
    burst: int
    max_streams_per_client: int = 0
    max_streams: int = 0

    def __post_init__(self) -> None:
        if self.rate < 0 or self.burst < 0 or self.max_streams_per_client < 0 or self.max_streams < 0:
            raise ValueError("limits must not be negative")

    @property
    def rate_limited(self) -> bool:
        return self.rate > 0 and self.burst > 0 and not math.isinf(self.rate)

    def new_bucket(self) -> TokenBucket | None:
        """A full bucket for a new client, or None when the request rate is not limited."""
        return TokenBucket(self.rate, self.burst) if self.rate_limited else None

    @property
    def policy_field(self) -> str | None:
        """The RateLimit-Policy field value, the same on every response; None when nothing is advertised.

        The bucket is advertised as ``burst`` requests per the time it takes to refill (rounded up to a whole
        second, as ``w`` must be): a client that keeps to it is never refused by the bucket.

        >>> LimitPolicy(rate=2.0, burst=20, max_streams_per_client=8).policy_field
        '"rate";q=20;w=10, "streams";q=8;qu="concurrent-requests"'
        """
        items: list[str] = []
        if self.rate_limited:
            window = max(1, math.ceil(self.burst / exact_rate(self.rate)))
            items.append(f'"{RATE_POLICY}";q={_sf_int(self.burst)};w={_sf_int(window)}')
        if self.max_streams_per_client:
            items.append(f'"{STREAMS_POLICY}";q={_sf_int(self.max_streams_per_client)};qu="concurrent-requests"')
        return ", ".join(items) or None

    def header_fields(
        self,
        *,
        remaining: int | None,
        reset: float | None,
        streams: int,
    ) -> dict[str, str]:
        """RateLimit-Policy and RateLimit for a response.

        `remaining` and `reset` describe the client's bucket (`reset` None leaves ``t`` out: on a refusal for
        another reason, a ``t`` later than Retry-After would contradict it, draft §6); `streams` is how many
        streams the client holds, this one included when it was admitted.
        """
        policy = self.policy_field
        if policy is None:
            return {}
        items: list[str] = []
        if self.rate_limited and remaining is not None:
            item = f'"{RATE_POLICY}";r={_sf_int(remaining)}'
            if reset is not None and reset > 0:
                item += f";t={_sf_int(_whole_seconds_up(reset))}"
            items.append(item)
        if self.max_streams_per_client:
            items.append(f'"{STREAMS_POLICY}";r={_sf_int(self.max_streams_per_client - streams)}')
        fields = {"RateLimit-Policy": policy}
        if items:
            fields["RateLimit"] = ", ".join(items)
        return fields
