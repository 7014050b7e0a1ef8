"""server/auth_failures.py: the per-address failure buckets, with the time passed in (no sleeps)."""

from __future__ import annotations

import doctest

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import server.auth_failures
from server.auth_failures import AuthFailurePolicy, AuthFailures

A, B = "ip:192.0.2.1", "ip:198.51.100.7"


def table(failures: int = 3, rate: float = 0.5, max_addresses: int = 100) -> AuthFailures:
    return AuthFailures(AuthFailurePolicy(failures, rate, max_addresses))


def test_docstring_examples_run() -> None:
    failures, tried = doctest.testmod(server.auth_failures)
    assert tried
    assert not failures


def test_the_failures_allowed_then_a_wait_as_long_as_one_failure_takes_to_be_forgiven() -> None:
    t = table(failures=3, rate=0.5)
    for _ in range(3):
        assert t.retry_after(A, 0.0) is None
        t.failed(A, 0.0)
    assert t.retry_after(A, 0.0) == 2.0
    assert t.retry_after(A, 1.5) == 0.5
    assert t.retry_after(A, 2.0) is None
    t.failed(A, 2.0)
    assert t.retry_after(A, 2.0) == 2.0  # the one forgiven failure was used at once


def test_addresses_are_counted_apart() -> None:
    t = table(failures=1)
    t.failed(A, 0.0)
    assert t.retry_after(A, 0.0) is not None
    assert t.retry_after(B, 0.0) is None


def test_a_refilled_bucket_is_forgotten() -> None:
    t = table(failures=2, rate=1.0)
    t.failed(A, 0.0)
    assert len(t) == 1
    assert t.retry_after(A, 1.0) is None
    assert len(t) == 0


def test_a_failure_it_was_not_allowed_to_make_pushes_nothing_further() -> None:
    t = table(failures=1, rate=1.0)
    t.failed(A, 0.0)
    t.failed(A, 0.0)  # the caller should have refused it: it costs nothing
    assert t.retry_after(A, 0.0) == 1.0


def test_memory_is_bounded_and_refilled_buckets_go_first() -> None:
    t = table(failures=2, rate=1.0, max_addresses=3)
    t.failed("ip:old", 0.0)  # refilled by t=1
    t.failed(A, 5.0)
    t.failed(B, 5.0)
    t.failed("ip:new", 5.0)
    assert len(t) == 3
    assert t.evicted_busy == 0  # the refilled bucket made room
    t.failed("ip:newer", 5.0)
    assert len(t) == 3
    assert t.evicted_busy == 1  # every bucket busy: the oldest goes, and starts again with a full one


@pytest.mark.parametrize(("failures", "rate"), [(0, 1.0), (3, 0.0)], ids=["no-failures", "no-rate"])
def test_a_policy_of_zero_is_off(failures: int, rate: float) -> None:
    assert not AuthFailurePolicy(failures, rate).enabled
    with pytest.raises(ValueError, match="needs"):
        AuthFailures(AuthFailurePolicy(failures, rate))


@pytest.mark.parametrize(
    ("failures", "rate", "max_addresses"), [(-1, 1.0, 1), (1, -1.0, 1), (1, float("nan"), 1), (1, 1.0, 0)]
)
def test_a_bad_policy_is_refused(failures: int, rate: float, max_addresses: int) -> None:
    with pytest.raises(ValueError, match="negative"):
        AuthFailurePolicy(failures, rate, max_addresses)


@settings(max_examples=200, deadline=None)
@given(
    failures=st.integers(1, 5),
    rate=st.sampled_from([0.1, 0.5, 1.0, 3.0]),
    gaps=st.lists(st.floats(0, 3, allow_nan=False), min_size=1, max_size=60),
)
def test_an_address_never_tries_more_keys_than_the_bucket_allows(failures: int, rate: float, gaps: list[float]) -> None:
    """Whoever keeps guessing from one address gets at most ``failures + rate * t`` guesses in any t seconds."""
    t = table(failures=failures, rate=rate)
    now, tried = 0.0, []
    for gap in gaps:
        now += gap
        if t.retry_after(A, now) is None:
            tried.append(now)
            t.failed(A, now)
    for i, start in enumerate(tried):
        for j in range(i, len(tried)):
            assert j - i + 1 <= failures + rate * (tried[j] - start) + 1e-9
