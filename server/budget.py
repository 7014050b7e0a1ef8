"""Token budgets, sans-IO: what a request is estimated to cost, what it is charged, and the bucket arithmetic.

Nothing here reads a clock, awaits or touches a socket; the backends (`server/budget_backends.py`) own clocks and
state. Requests per minute do not bound what a client costs (one request is 20 tokens, the next 20,000), so beside
the request bucket each client has a **tokens-per-minute** bucket, and optionally a **daily token quota**.

    estimate(chat, ceiling) -> Estimate     prompt tokens (estimated) + the reply's ceiling: what is reserved
    charge(estimate, usage, output_chars)   what a stream is charged at its end
    TokenBudgetPolicy                       tokens per minute and per day; the RateLimit header fields
    reserve(policy, tat, now, tokens)       GCRA over tokens (`limits.TokenBucket`): a `Reserved`, or a refusal
    settle_tat(tat, now, hold, charged)     the bucket after a reservation is replaced by what was charged
    quota_period(unix_seconds)              the UTC day a quota counts in, and when it resets

**The estimate** needs no tokenizer: about four characters of English per token (OpenAI's rule of thumb), rounded
up, plus `MESSAGE_OVERHEAD_TOKENS` per message for the role and delimiters and `REPLY_OVERHEAD_TOKENS` for the
reply's priming (OpenAI's cookbook counts 3-4 and 3). Any tokenizer would be exact for one model family only, and
the estimate is reconciled with the upstream's own count at the end anyway. The reply is reserved at its
``max_completion_tokens`` or ``max_tokens``, or at the configured ceiling when the request sets neither.

**The charge**: the upstream's reported ``usage.total_tokens`` when it sent one (the relay asks for it with
``stream_options.include_usage``); otherwise the prompt's estimate plus the relayed output's characters / 4,
rounded up. A stream cut short (client gone, timeout, upstream error, stop, shutdown) reports no usage, so it is
charged its prompt and what it relayed, not its reservation.

**The bucket** is GCRA like the request bucket: its state is its theoretical arrival time (TAT), and a reservation
of ``R`` tokens at ``now`` takes the span ``[max(TAT, now), max(TAT, now) + R * I)`` of the bucket's timeline
(``I`` = seconds per token). At the end, a stream charged ``c <= R`` gives back the part of its span after
``start + c * I`` that still lies in the future: the part already past was repaid by the refill while the stream
ran, and giving it back too would credit tokens the client could never have used. So a reservation and its
refund together never admit more than charging ``c`` at the start would have: in any window of ``t`` seconds the
tokens charged to the requests started in it stay within ``tokens_per_minute + rate * t`` (a property test checks
it). A stream charged more than its reservation (usage beyond the estimate) is not cut; the excess is taken from
the bucket at the end, which may put it in debt, and the next request waits until it is repaid.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Protocol

from .chat_request import ChatRequest
from .events import Delta as _Delta
from .events import Event, Reasoning, Refusal, ToolCallDelta, Usage
from .limits import TokenBucket, service_limit

CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD_TOKENS = 4
REPLY_OVERHEAD_TOKENS = 3
DAY_SECONDS = 86_400

TOKENS_POLICY = "tokens"
DAILY_TOKENS_POLICY = "daily-tokens"
_SF_INTEGER_MAX = 999_999_999_999_999  # RFC 9651 §3.3.1: at most 15 digits


def tokens_for_chars(chars: int) -> int:
    """Tokens estimated for `chars` characters of text: a quarter, rounded up.

    >>> tokens_for_chars(0), tokens_for_chars(1), tokens_for_chars(8), tokens_for_chars(9)
    (0, 1, 2, 3)
    """
    return -(-max(0, chars) // CHARS_PER_TOKEN)


def output_chars(events: Iterable[Event]) -> int:
    """The characters of model output in `events` (answer, reasoning, refusal, tool-call pieces; no errors)."""
    total = 0
    for event in events:
        if isinstance(event, (_Delta, Reasoning, Refusal)):
            total += len(event.content)
        elif isinstance(event, ToolCallDelta):
            total += len(event.arguments) + len(event.name or "")
    return total


@dataclass(frozen=True, slots=True)
class Estimate:
    """What a request reserves: its prompt's estimated tokens and the most its reply may take."""

    prompt_tokens: int
    reply_tokens: int

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.reply_tokens


def estimate(chat: ChatRequest, ceiling: int) -> Estimate:
    """The reservation for `chat`: prompt estimate (text and earlier tool calls) plus its ``max_completion_tokens``
    or ``max_tokens``, or `ceiling` when it sets neither.

    >>> from server.chat_request import Message
    >>> estimate(ChatRequest((Message("user", "Hello there!"),), "m"), ceiling=100)
    Estimate(prompt_tokens=10, reply_tokens=100)
    >>> estimate(ChatRequest((Message("system", "Be brief."), Message("user", "Hi")), "m", max_tokens=5), 100)
    Estimate(prompt_tokens=15, reply_tokens=5)
    >>> estimate(ChatRequest((Message("user", "Hi"),), "m", max_tokens=50, max_completion_tokens=7), 100)
    Estimate(prompt_tokens=8, reply_tokens=7)
    """
    prompt = REPLY_OVERHEAD_TOKENS + sum(
        MESSAGE_OVERHEAD_TOKENS
        + tokens_for_chars(len(message.content) + sum(len(c.name) + len(c.arguments) for c in message.tool_calls))
        for message in chat.messages
    )
    limit = chat.token_limit
    return Estimate(prompt, limit if limit is not None else ceiling)


def charge(estimated: Estimate, usage: Usage | None, relayed_chars: int) -> int:
    """What a stream is charged at its end: the upstream's count when it reported one, else our estimate of what
    it consumed (its prompt, and the output it relayed).

    >>> charge(Estimate(10, 100), Usage(9, 20, 29), relayed_chars=400)
    29
    >>> charge(Estimate(10, 100), None, relayed_chars=41)
    21
    """
    if usage is not None and usage.total_tokens >= 0:
        return usage.total_tokens
    return estimated.prompt_tokens + tokens_for_chars(relayed_chars)


class TokenReservation(Protocol):
    """A reservation held by a generation until it ends (`server.generation.Generation`'s ``budget``)."""

    async def settle(self, usage: Usage | None, relayed_chars: int) -> None:
        """Replace the reservation with what the stream consumed. Called once, however the stream ended."""
        ...


# -- the bucket --------------------------------------------------------------------------------------------------


def interval(tokens_per_minute: int) -> Fraction:
    """Seconds per token of a bucket refilled at `tokens_per_minute`."""
    return Fraction(60, tokens_per_minute)


@dataclass(frozen=True, slots=True)
class Hold:
    """A reservation's span on its bucket's timeline, ``[start, end)``, and its size in tokens."""

    start: Fraction
    end: Fraction
    tokens: int


@dataclass(frozen=True, slots=True)
class Reserved:
    """The outcome of `reserve`: `tat` is the bucket after it (unchanged when refused), `hold` its span."""

    allowed: bool
    retry_after: float
    remaining: int
    reset: float
    tat: Fraction | None
    hold: Hold | None


def reserve(tokens_per_minute: int, tat: Fraction | None, now: float, tokens: int) -> Reserved:
    """Take `tokens` from a bucket of `tokens_per_minute` (refilled over a minute) whose TAT is `tat`.

    >>> first = reserve(60, None, now=0.0, tokens=50)
    >>> first.allowed, first.remaining, first.hold
    (True, 10, Hold(start=Fraction(0, 1), end=Fraction(50, 1), tokens=50))
    >>> second = reserve(60, first.tat, now=0.0, tokens=20)
    >>> second.allowed, second.retry_after
    (False, 10.0)
    """
    if tokens > tokens_per_minute:
        raise ValueError(f"a reservation of {tokens} tokens can never fit a budget of {tokens_per_minute}")
    bucket = TokenBucket(tokens_per_minute / 60, tokens_per_minute, tat)
    decision = bucket.acquire(now, cost=tokens)
    if not decision.allowed:
        return Reserved(False, decision.retry_after, decision.remaining, decision.reset, tat, None)
    at = Fraction(now)
    start = at if tat is None or tat < at else tat
    new_tat = decision.bucket.tat
    hold = Hold(start, new_tat if new_tat is not None else start, tokens)
    return Reserved(True, 0.0, decision.remaining, decision.reset, new_tat, hold)


def settle_tat(tokens_per_minute: int, tat: Fraction | None, now: float, hold: Hold, charged: int) -> Fraction | None:
    """The bucket's TAT once the reservation `hold` is replaced by `charged` tokens (None: the bucket is full).

    A refund gives back only the part of the hold's span still in the future (see the module docstring); a charge
    beyond the hold is taken at `now`, whatever the bucket holds (the stream has run; the next request waits).

    >>> hold = reserve(60, None, now=0.0, tokens=50).hold
    >>> settle_tat(60, Fraction(50), now=5.0, hold=hold, charged=20)  # 30 tokens back, from 50 s to 20 s
    Fraction(20, 1)
    >>> settle_tat(60, Fraction(50), now=30.0, hold=hold, charged=20) is None  # 20 s to 30 s was repaid: full
    True
    >>> settle_tat(60, Fraction(50), now=5.0, hold=hold, charged=70)  # 20 more than reserved
    Fraction(70, 1)
    """
    step = interval(tokens_per_minute)
    at = Fraction(now)
    current = at if tat is None or tat < at else tat
    if charged <= hold.tokens:
        refund = hold.end - max(hold.start + charged * step, at)
        if refund <= 0:
            return tat
        settled = max(current - refund, at)
    else:
        settled = current + (charged - hold.tokens) * step
    return settled if settled > at else None


def level(tokens_per_minute: int, tat: Fraction | None, now: float) -> tuple[int, float]:
    """(remaining, reset) of a bucket: whole tokens available now, seconds until one more is."""
    debt = Fraction(0) if tat is None else tat - Fraction(now)
    return service_limit(debt, Fraction(tokens_per_minute, 60), tokens_per_minute)


# -- the daily quota ---------------------------------------------------------------------------------------------


def quota_period(unix_seconds: float) -> tuple[int, int]:
    """(period, resets_at): the UTC day (days since the epoch) a quota counts in, and its end in Unix seconds.

    >>> quota_period(86_400 * 3 + 5)
    (3, 345600)
    """
    day = math.floor(unix_seconds / DAY_SECONDS)
    return day, (day + 1) * DAY_SECONDS


# -- policy and header fields -------------------------------------------------------------------------------------


def _sf_int(value: int) -> str:
    return str(min(max(value, 0), _SF_INTEGER_MAX))


@dataclass(frozen=True, slots=True)
class TokenBudgetPolicy:
    """One client's token limits; 0 turns one off.

    `tokens_per_minute`: a bucket of that many tokens, refilled over a minute. `tokens_per_day`: a quota per UTC
    day. `ceiling`: what a request without ``max_tokens`` reserves for its reply.
    """

    tokens_per_minute: int = 0
    tokens_per_day: int = 0
    ceiling: int = 4096

    def __post_init__(self) -> None:
        if self.tokens_per_minute < 0 or self.tokens_per_day < 0 or self.ceiling < 1:
            raise ValueError("token budgets must not be negative, and the ceiling must be at least 1")

    @property
    def enabled(self) -> bool:
        return bool(self.tokens_per_minute or self.tokens_per_day)

    @property
    def policy_field(self) -> str:
        """RateLimit-Policy items (draft-ietf-httpapi-ratelimit-headers-11 §3): the minute's bucket and the day's
        quota, in tokens. ``qu="tokens"`` is not one of the draft's registered units (§7.3): a client that knows
        only those ignores these items and still reads the request policy beside them.

        >>> TokenBudgetPolicy(tokens_per_minute=10_000, tokens_per_day=1_000_000).policy_field
        '"tokens";q=10000;w=60;qu="tokens", "daily-tokens";q=1000000;w=86400;qu="tokens"'
        """
        items: list[str] = []
        if self.tokens_per_minute:
            items.append(f'"{TOKENS_POLICY}";q={_sf_int(self.tokens_per_minute)};w=60;qu="tokens"')
        if self.tokens_per_day:
            items.append(f'"{DAILY_TOKENS_POLICY}";q={_sf_int(self.tokens_per_day)};w={DAY_SECONDS};qu="tokens"')
        return ", ".join(items)

    def header_fields(
        self, *, remaining: int | None, reset: float | None, quota_left: int | None, quota_reset: float | None
    ) -> dict[str, str]:
        """RateLimit-Policy and RateLimit items for the token limits (``t`` left out when `reset` is None)."""
        if not self.enabled:
            return {}
        items: list[str] = []
        if self.tokens_per_minute and remaining is not None:
            item = f'"{TOKENS_POLICY}";r={_sf_int(remaining)}'
            if reset is not None and reset > 0:
                item += f";t={_sf_int(math.ceil(reset))}"
            items.append(item)
        if self.tokens_per_day and quota_left is not None:
            item = f'"{DAILY_TOKENS_POLICY}";r={_sf_int(quota_left)}'
            if quota_reset is not None and quota_reset > 0:
                item += f";t={_sf_int(math.ceil(quota_reset))}"
            items.append(item)
        fields = {"RateLimit-Policy": self.policy_field}
        if items:
            fields["RateLimit"] = ", ".join(items)
        return fields


def merge_fields(first: Mapping[str, str], second: Mapping[str, str]) -> dict[str, str]:
    """Header fields of both, a field in both joined as one Structured Field List (RFC 9651 §3.1: list members
    are comma-separated, and RFC 9110 §5.3 makes two field lines of a list one value joined by commas).

    >>> merge_fields({"RateLimit": '"rate";r=1'}, {"RateLimit": '"tokens";r=5', "X": "y"})
    {'RateLimit': '"rate";r=1, "tokens";r=5', 'X': 'y'}
    """
    merged = dict(first)
    for name, value in second.items():
        merged[name] = f"{merged[name]}, {value}" if merged.get(name) else value
    return merged


__all__ = [
    "CHARS_PER_TOKEN",
    "MESSAGE_OVERHEAD_TOKENS",
    "REPLY_OVERHEAD_TOKENS",
    "Estimate",
    "Hold",
    "Reserved",
    "TokenBudgetPolicy",
    "TokenReservation",
    "charge",
    "estimate",
    "level",
    "merge_fields",
    "output_chars",
    "quota_period",
    "reserve",
    "settle_tat",
    "tokens_for_chars",
]
