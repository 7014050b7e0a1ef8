"""The admission arithmetic of server/limits.py: exact, with time passed in, so no test sleeps."""

from __future__ import annotations

import dataclasses
import doctest
import math
import re
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import server.limits
from server.limits import Decision, LimitPolicy, TokenBucket, exact_rate, float_up, parse_rate, service_limit


def test_docstring_examples_run() -> None:
    failures, tried = doctest.testmod(server.limits)
    assert tried > 0
    assert failures == 0


# -- parse_rate -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "per_second"),
    [("2/s", 2.0), ("30/m", 0.5), ("3600/h", 1.0), (" 1.5/s ", 1.5), ("0/s", 0.0), ("1/m", 1 / 60)],
    ids=["per-second", "per-minute", "per-hour", "spaces-and-fractions", "zero", "inexact"],
)
def test_parse_rate(text: str, per_second: float) -> None:
    assert parse_rate(text) == per_second


@pytest.mark.parametrize(
    "text",
    ["2", "2/d", "x/s", "-1/s", "nan/s", "inf/s", "", "/s", "2/"],
    ids=["no-unit", "unknown-unit", "not-a-number", "negative", "nan", "infinite", "empty", "no-count", "unit-empty"],
)
def test_parse_rate_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="not a rate"):
        parse_rate(text)


def test_exact_rate_reads_the_fraction_that_was_written() -> None:
    assert exact_rate(parse_rate("1/m")) == Fraction(1, 60)
    assert exact_rate(parse_rate("7/h")) == Fraction(7, 3600)
    assert exact_rate(0.1) == Fraction(1, 10)
    tiny = 1e-9  # no small denominator is near it: taken as the float it is
    assert exact_rate(tiny) == Fraction(tiny)


def test_float_up_never_rounds_down() -> None:
    third = Fraction(1, 3)
    assert Fraction(float_up(third)) >= third
    assert float_up(Fraction(1, 2)) == 0.5  # exact values stay exact
    assert float_up(third) == math.nextafter(float(third), math.inf)  # float(1/3) is just below 1/3


# -- TokenBucket: illegal states, one test each ------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.0, -1.0, math.inf, math.nan], ids=["zero", "negative", "infinite", "nan"])
def test_bucket_needs_a_positive_finite_rate(rate: float) -> None:
    with pytest.raises(ValueError, match="positive, finite rate"):
        TokenBucket(rate=rate, burst=1)


def test_bucket_needs_a_token() -> None:
    with pytest.raises(ValueError, match="at least one token"):
        TokenBucket(rate=1.0, burst=0)


def test_negative_cost_is_refused() -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        TokenBucket(rate=1.0, burst=2).acquire(0.0, cost=-1)


def test_cost_larger_than_the_bucket_can_never_be_admitted() -> None:
    with pytest.raises(ValueError, match="can never fit"):
        TokenBucket(rate=1.0, burst=2).acquire(0.0, cost=3)


def test_bucket_and_decision_are_frozen_values() -> None:
    bucket = TokenBucket(rate=1.0, burst=2)
    decision = bucket.acquire(0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        bucket.tat = None  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        decision.allowed = False  # type: ignore[misc]
    assert bucket.tat is None  # acquiring made a new bucket; the old value is unchanged


# -- TokenBucket: behaviour --------------------------------------------------------------------------------------


def _run(bucket: TokenBucket, times: list[float]) -> tuple[list[Decision], TokenBucket]:
    decisions = []
    for now in times:
        decision = bucket.acquire(now)
        decisions.append(decision)
        bucket = decision.bucket
    return decisions, bucket


def test_a_new_client_gets_the_whole_burst_at_once_and_then_waits_one_interval() -> None:
    decisions, _ = _run(TokenBucket(rate=2.0, burst=3), [10.0] * 4)
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0]
    refused = decisions[-1]
    assert refused.retry_after == 0.5
    assert refused.reset == refused.retry_after  # a refusal's effective window ends when it would be admitted


def test_reset_is_when_one_more_request_becomes_available() -> None:
    decisions, bucket = _run(TokenBucket(rate=1.0, burst=3), [0.0, 0.0])
    assert (decisions[-1].remaining, decisions[-1].reset) == (1, 1.0)
    later = bucket.acquire(0.25, cost=0)  # 1.25 tokens: one request now, the next one in 0.75 s
    assert (later.allowed, later.remaining, later.reset) == (True, 1, 0.75)


def test_a_full_bucket_has_no_reset() -> None:
    peek = TokenBucket(rate=1.0, burst=3).acquire(5.0, cost=0)
    assert (peek.allowed, peek.remaining, peek.reset) == (True, 3, 0.0)


def test_retry_after_is_exact_neither_early_nor_late() -> None:
    decisions, bucket = _run(TokenBucket(rate=4.0, burst=1), [1.0, 1.0625])
    refused = decisions[-1]
    assert not refused.allowed
    assert refused.retry_after == 0.1875  # 1.0 + 1/4 - 1.0625
    at = 1.0625 + refused.retry_after
    assert bucket.acquire(at).allowed
    assert not bucket.acquire(math.nextafter(at, 0.0)).allowed


def test_refused_requests_cost_nothing() -> None:
    decisions, bucket = _run(TokenBucket(rate=1.0, burst=1), [0.0, 0.1, 0.2, 0.3, 0.9])
    assert [d.allowed for d in decisions] == [True, False, False, False, False]
    assert decisions[-1].retry_after == pytest.approx(0.1)
    assert all(d.bucket is bucket for d in decisions[1:])
    assert bucket.acquire(1.0).allowed  # knocking did not push the wait further out


def test_an_idle_bucket_refills_to_burst_and_no_further() -> None:
    decisions, bucket = _run(TokenBucket(rate=1.0, burst=2), [0.0, 0.0])
    assert not bucket.is_full(1.5)
    assert bucket.is_full(2.0)
    decisions, _ = _run(bucket, [1000.0] * 3)
    assert [d.allowed for d in decisions] == [True, True, False]


def test_a_client_keeping_to_the_rate_is_never_refused() -> None:
    decisions, _ = _run(TokenBucket(rate=parse_rate("30/m"), burst=1), [2.0 * i for i in range(100)])
    assert all(d.allowed for d in decisions)


def test_per_minute_rates_are_exact_at_the_boundary() -> None:
    # 1/m is not a float; a client sending every 60 s exactly is still admitted every time.
    decisions, _ = _run(TokenBucket(rate=parse_rate("1/m"), burst=1), [0.0, 60.0, 120.0, 179.0])
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert decisions[-1].retry_after == 1.0


def test_cost_zero_looks_without_taking() -> None:
    _, bucket = _run(TokenBucket(rate=1.0, burst=1), [0.0])
    peek = bucket.acquire(0.5, cost=0)
    assert peek.allowed
    assert peek.bucket is bucket
    assert (peek.remaining, peek.reset) == (0, 0.5)


def test_a_costly_request_waits_for_all_its_tokens() -> None:
    bucket = TokenBucket(rate=2.0, burst=4)
    first = bucket.acquire(0.0, cost=3)
    assert (first.allowed, first.remaining) == (True, 1)
    second = first.bucket.acquire(0.0, cost=2)
    assert (second.allowed, second.retry_after, second.remaining) == (False, 0.5, 1)


def test_time_going_backwards_stays_conservative() -> None:
    _, bucket = _run(TokenBucket(rate=1.0, burst=1), [100.0])
    back = bucket.acquire(50.0)
    assert not back.allowed
    assert back.remaining == 0
    assert back.retry_after == 51.0


def test_service_limit_of_a_debt() -> None:
    assert service_limit(Fraction(0), Fraction(1), 5) == (5, 0.0)
    assert service_limit(Fraction(5, 2), Fraction(1), 5) == (2, 0.5)
    assert service_limit(Fraction(-1), Fraction(1), 5) == (5, 0.0)  # a debt in the past is no debt
    assert service_limit(Fraction(7), Fraction(1), 5) == (0, 3.0)  # more than a full bucket owed


# -- the invariants, over any schedule ---------------------------------------------------------------------------

_rates = st.one_of(
    st.sampled_from([parse_rate(t) for t in ("1/s", "2/s", "10/s", "30/m", "1/m", "7/h", "3/s", "100/s")]),
    st.floats(min_value=0.01, max_value=1000.0, allow_nan=False, allow_infinity=False),
)
_gaps = st.lists(
    st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=3.0, allow_nan=False)),
    min_size=1,
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(rate=_rates, burst=st.integers(min_value=1, max_value=12), gaps=_gaps, start=st.floats(-1e6, 1e6))
def test_no_window_ever_admits_more_than_burst_plus_rate_times_its_length(
    rate: float, burst: int, gaps: list[float], start: float
) -> None:
    bucket = TokenBucket(rate=rate, burst=burst)
    now = start
    admitted: list[float] = []
    for gap in gaps:
        now += gap
        decision = bucket.acquire(now)
        bucket = decision.bucket
        if decision.allowed:
            admitted.append(now)
    exact = exact_rate(rate)
    # Every window [admitted[i], admitted[j]] holds j - i + 1 admissions; compared exactly, no tolerance.
    for i, first in enumerate(admitted):
        for j in range(i, len(admitted)):
            assert j - i + 1 <= burst + exact * (Fraction(admitted[j]) - Fraction(first))


@settings(max_examples=300, deadline=None)
@given(rate=_rates, burst=st.integers(min_value=1, max_value=12), gaps=_gaps)
def test_remaining_and_retry_after_tell_the_truth(rate: float, burst: int, gaps: list[float]) -> None:
    bucket = TokenBucket(rate=rate, burst=burst)
    now = 0.0
    for gap in gaps:
        now += gap
        decision = bucket.acquire(now)
        bucket = decision.bucket
        # `remaining`: exactly that many more requests at this instant are admitted, and no more.
        probe = bucket
        for _ in range(decision.remaining):
            step = probe.acquire(now)
            assert step.allowed
            probe = step.bucket
        assert not probe.acquire(now).allowed
        if not decision.allowed:
            assert decision.remaining == 0
            assert decision.retry_after > 0
            # At the exact moment Retry-After points to, the request is admitted.
            later = float_up(Fraction(now) + Fraction(decision.retry_after))
            assert bucket.acquire(later).allowed
        else:
            assert decision.retry_after == 0


# -- the RateLimit header fields ---------------------------------------------------------------------------------

# draft-ietf-httpapi-ratelimit-headers-11 §3, §4: an sf-list of sf-strings with parameters (RFC 9651 §3.1).
_ITEM = re.compile(r'"[a-z]+"(;[a-z]+=(\d{1,15}|"[a-z-]+"))+')


def _sf_list(value: str) -> list[str]:
    members = value.split(", ")
    assert all(_ITEM.fullmatch(member) for member in members), value
    return members


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (LimitPolicy(rate=2.0, burst=20), '"rate";q=20;w=10'),
        (LimitPolicy(rate=parse_rate("1/m"), burst=10), '"rate";q=10;w=600'),
        (LimitPolicy(rate=3.0, burst=1), '"rate";q=1;w=1'),
        (LimitPolicy(rate=parse_rate("7/h"), burst=1), '"rate";q=1;w=515'),
        (LimitPolicy(rate=0.0, burst=0, max_streams_per_client=4), '"streams";q=4;qu="concurrent-requests"'),
        (
            LimitPolicy(rate=1.0, burst=5, max_streams_per_client=2, max_streams=100),
            '"rate";q=5;w=5, "streams";q=2;qu="concurrent-requests"',
        ),
    ],
    ids=["two-per-second", "per-minute", "window-at-least-one-second", "window-rounded-up", "streams-only", "both"],
)
def test_policy_field(policy: LimitPolicy, expected: str) -> None:
    assert policy.policy_field == expected
    _sf_list(expected)


def test_the_global_cap_is_not_advertised() -> None:
    # draft §8.2: do not tell untrusted parties the server's capacity.
    policy = LimitPolicy(rate=0.0, burst=0, max_streams=10)
    assert policy.policy_field is None
    assert policy.header_fields(remaining=None, reset=None, streams=1) == {}


def test_zero_turns_the_bucket_off() -> None:
    assert LimitPolicy(rate=0.0, burst=10).new_bucket() is None
    assert LimitPolicy(rate=1.0, burst=0).new_bucket() is None
    assert LimitPolicy(rate=1.0, burst=2).new_bucket() == TokenBucket(1.0, 2)


def test_negative_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        LimitPolicy(rate=1.0, burst=-1)


def test_header_fields_of_an_admitted_stream() -> None:
    policy = LimitPolicy(rate=1.0, burst=5, max_streams_per_client=2)
    fields = policy.header_fields(remaining=3, reset=0.25, streams=1)
    assert fields == {
        "RateLimit-Policy": '"rate";q=5;w=5, "streams";q=2;qu="concurrent-requests"',
        "RateLimit": '"rate";r=3;t=1, "streams";r=1',
    }
    _sf_list(fields["RateLimit"])


def test_header_fields_leave_t_out_when_unknown_or_full() -> None:
    policy = LimitPolicy(rate=1.0, burst=5)
    assert policy.header_fields(remaining=0, reset=None, streams=0)["RateLimit"] == '"rate";r=0'
    assert policy.header_fields(remaining=5, reset=0.0, streams=0)["RateLimit"] == '"rate";r=5'


def test_header_integers_stay_within_structured_field_limits() -> None:
    policy = LimitPolicy(rate=1e-9, burst=10**6)
    fields = policy.header_fields(remaining=10**6, reset=1e20, streams=0)
    _sf_list(fields["RateLimit-Policy"])
    assert fields["RateLimit"] == '"rate";r=1000000;t=999999999999999'


def test_header_fields_without_a_bucket_state_give_the_policy_only() -> None:
    policy = LimitPolicy(rate=1.0, burst=2)
    assert policy.header_fields(remaining=None, reset=None, streams=0) == {"RateLimit-Policy": '"rate";q=2;w=2'}
