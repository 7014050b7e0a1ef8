"""Token budgets: the estimate, the charge, the bucket arithmetic (server/budget.py), and the in-process backend
with its clocks passed in (server/budget_backends.py). No test sleeps."""

from __future__ import annotations

import doctest
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import server.budget
from server.budget import (
    Estimate,
    TokenBudgetPolicy,
    charge,
    estimate,
    merge_fields,
    output_chars,
    quota_period,
    reserve,
    settle_tat,
    tokens_for_chars,
)
from server.budget_backends import KeyBudget, LocalBudgets, policies
from server.chat_request import ChatRequest, Message
from server.client_key import APIKeys
from server.config import Config, ConfigError
from server.errors import RequestError, TokenBudgetExhausted, TokenQuotaExhausted
from server.events import Delta, Done, Error, Reasoning, Refusal, ToolCallDelta, Usage
from server.generation import Generation, GenerationSettings, Outcome

from .scripted import ScriptedProvider


def test_docstring_examples_run() -> None:
    failures, tried = doctest.testmod(server.budget)
    assert tried > 0
    assert failures == 0


# -- estimate and charge ---------------------------------------------------------------------------------------


def _chat(*contents: str, max_tokens: int | None = None) -> ChatRequest:
    return ChatRequest(tuple(Message("user", text) for text in contents), "m", max_tokens=max_tokens)


@pytest.mark.parametrize(
    ("chat", "ceiling", "expected"),
    [
        (_chat("abcd"), 50, Estimate(3 + 4 + 1, 50)),
        (_chat("abcde"), 50, Estimate(3 + 4 + 2, 50)),
        (_chat("x" * 4000, max_tokens=7), 50, Estimate(3 + 4 + 1000, 7)),
        (_chat("a", "b", "c"), 1, Estimate(3 + 3 * 5, 1)),
        (_chat("héllo wörld 🙂"), 10, Estimate(3 + 4 + 4, 10)),
    ],
    ids=["four-chars-one-token", "rounded-up", "max-tokens-wins", "per-message-overhead", "characters-not-bytes"],
)
def test_estimate(chat: ChatRequest, ceiling: int, expected: Estimate) -> None:
    assert estimate(chat, ceiling) == expected
    assert expected.tokens == expected.prompt_tokens + expected.reply_tokens


@pytest.mark.parametrize(
    ("usage", "chars", "expected"),
    [
        (Usage(7, 4, 11), 1000, 11),
        (None, 0, 10),
        (None, 1, 11),
        (None, 400, 110),
        (Usage(0, 0, 0), 400, 0),
    ],
    ids=["usage-wins", "cut-before-first-token", "one-char", "cut-mid-reply", "reported-zero"],
)
def test_charge(usage: Usage | None, chars: int, expected: int) -> None:
    assert charge(Estimate(10, 500), usage, chars) == expected


def test_output_chars_counts_model_output_only() -> None:
    events = [Delta("abc"), Reasoning("de"), Refusal("f"), ToolCallDelta(0, "call_1", "fn", "{}"), Error("x", "long")]
    assert output_chars(events) == 3 + 2 + 1 + 2 + 2
    assert output_chars([Done("stop", Usage(1, 2, 3))]) == 0


@pytest.mark.parametrize(("chars", "tokens"), [(0, 0), (-5, 0), (3, 1), (4, 1), (5, 2)])
def test_tokens_for_chars(chars: int, tokens: int) -> None:
    assert tokens_for_chars(chars) == tokens


# -- the bucket --------------------------------------------------------------------------------------------------


def test_a_reservation_larger_than_the_bucket_is_an_error() -> None:
    with pytest.raises(ValueError, match="never fit"):
        reserve(100, None, 0.0, 101)


def test_a_refund_gives_back_only_the_future_part_of_the_hold() -> None:
    first = reserve(60, None, 0.0, 60)  # the whole minute: [0, 60)
    assert first.hold is not None
    assert not reserve(60, first.tat, 0.0, 1).allowed
    # Ended at 10 s having used 20: [20, 60) is given back, the bucket is as if 20 were taken at 0.
    tat = settle_tat(60, first.tat, 10.0, first.hold, 20)
    assert tat == Fraction(20)
    assert reserve(60, tat, 10.0, 50).allowed
    assert not reserve(60, tat, 10.0, 51).allowed
    # Ended at 40 s having used 20: [20, 40) was refilled already, only [40, 60) comes back: the bucket is full.
    assert settle_tat(60, first.tat, 40.0, first.hold, 20) is None


def test_a_charge_beyond_the_reservation_puts_the_bucket_in_debt() -> None:
    first = reserve(60, None, 0.0, 30)
    assert first.hold is not None
    tat = settle_tat(60, first.tat, 5.0, first.hold, 90)  # 60 more than reserved: the stream is not cut
    assert tat == Fraction(90)
    refused = reserve(60, tat, 5.0, 1)
    assert not refused.allowed
    assert refused.retry_after == 90 - 60 - 5 + 1  # until one token fits in a bucket 85 s in debt
    assert reserve(60, tat, 31.0, 1).allowed


def test_settling_the_exact_reservation_changes_nothing() -> None:
    first = reserve(120, None, 0.0, 40)
    assert first.hold is not None
    assert settle_tat(120, first.tat, 3.0, first.hold, 40) == first.tat


@dataclass
class _Request:
    at: float
    reserved: int
    charged: int | None = None


def _simulate(
    tokens_per_minute: int, ops: list[tuple[int, int, int]], usage_factor: Fraction
) -> tuple[list[_Request], list[tuple[float, int]]]:
    """Run `ops` ((dt in tenths of a second, reservation size in % of the budget (<= 0: settle one instead), which
    open request to settle and how much it used)) against the pure arithmetic; returns the admitted requests with
    their charges and the overruns (time, tokens) charged."""
    now = 0.0
    tat: Fraction | None = None
    open_: list[tuple[_Request, object]] = []
    admitted: list[_Request] = []
    overruns: list[tuple[float, int]] = []
    for dt, size, pick in ops:
        now += dt / 10
        if size > 0:
            size = max(1, tokens_per_minute * size // 100)
            taken = reserve(tokens_per_minute, tat, now, size)
            if taken.allowed:
                tat = taken.tat
                request = _Request(now, size)
                admitted.append(request)
                open_.append((request, taken.hold))
        elif open_:
            request, hold = open_.pop(pick % len(open_))
            charged = int(request.reserved * usage_factor * (pick % 7) / 6)
            request.charged = charged
            assert isinstance(hold, server.budget.Hold)
            tat = settle_tat(tokens_per_minute, tat, now, hold, charged)
            if charged > request.reserved:
                overruns.append((now, charged - request.reserved))
    for request, _ in open_:
        request.charged = request.reserved  # never settled: charged its reservation
    return admitted, overruns


# Time steps around the bucket's refill time (60 s), so that streams outlive it; reservations from a tenth of the
# budget to all of it; settlements as often as reservations.
_OPS = st.lists(
    st.tuples(
        st.one_of(st.sampled_from([0, 1, 100, 300, 590, 600, 610]), st.integers(0, 700)),
        st.one_of(st.sampled_from([0, 0, 10, 50, 99, 100]), st.integers(-60, 100)),
        st.integers(0, 1000),
    ),
    min_size=1,
    max_size=60,
)
# A stream that outlives its bucket's refill and then gives all back: a refund of the part of its hold already
# refilled would let two whole budgets in at once (found by an earlier, naive refund).
_OUTLIVED = [(0, 100, 0), (600, 100, 0), (0, -1, 0), (0, 100, 0)]


@settings(max_examples=500, deadline=None)
@given(tokens_per_minute=st.integers(100, 600), ops=_OPS)
@example(tokens_per_minute=100, ops=_OUTLIVED)
def test_reservations_and_refunds_never_admit_more_than_the_budget(tokens_per_minute: int, ops: list) -> None:  # type: ignore[type-arg]
    """Usage up to the reservation: the tokens charged to the requests started in any window of t seconds stay
    within tokens_per_minute + rate * t, however reservations, refunds and time interleave."""
    admitted, _ = _simulate(tokens_per_minute, ops, Fraction(1))
    rate = Fraction(tokens_per_minute, 60)
    for i, first in enumerate(admitted):
        total = 0
        for last in admitted[i:]:
            assert last.charged is not None
            total += last.charged
            assert total <= tokens_per_minute + rate * (Fraction(last.at) - Fraction(first.at))


@settings(max_examples=300, deadline=None)
@given(tokens_per_minute=st.integers(100, 600), ops=_OPS)
def test_usage_beyond_the_reservation_is_charged_and_the_next_request_waits(
    tokens_per_minute: int,
    ops: list,  # type: ignore[type-arg]
) -> None:
    """Usage up to twice the reservation: the part of each charge within its reservation (counted when it started)
    and every overrun (counted when it was settled) together stay within tokens_per_minute + rate * t plus the
    overruns settled in the window: an overrun is never forgiven, it delays what follows."""
    admitted, overruns = _simulate(tokens_per_minute, ops, Fraction(2))
    rate = Fraction(tokens_per_minute, 60)
    events = sorted(
        [(Fraction(r.at), min(r.charged or 0, r.reserved), 0) for r in admitted]
        + [(Fraction(at), tokens, tokens) for at, tokens in overruns]
    )
    for i in range(len(events)):
        total = forgiven = 0
        for at, tokens, overrun in events[i:]:
            total += tokens
            forgiven += overrun
            assert total - forgiven <= tokens_per_minute + rate * (at - events[i][0])


# -- policy and header fields ------------------------------------------------------------------------------------


def test_header_fields_name_the_token_policies() -> None:
    policy = TokenBudgetPolicy(tokens_per_minute=6000, tokens_per_day=100_000)
    fields = policy.header_fields(remaining=5000, reset=1.2, quota_left=90_000, quota_reset=3600.5)
    assert fields == {
        "RateLimit-Policy": '"tokens";q=6000;w=60;qu="tokens", "daily-tokens";q=100000;w=86400;qu="tokens"',
        "RateLimit": '"tokens";r=5000;t=2, "daily-tokens";r=90000;t=3601',
    }
    assert TokenBudgetPolicy().header_fields(remaining=1, reset=1, quota_left=1, quota_reset=1) == {}


def test_merge_fields_joins_lists() -> None:
    assert merge_fields({"A": "1"}, {"A": "2", "B": "3"}) == {"A": "1, 2", "B": "3"}
    assert merge_fields({}, {"A": "2"}) == {"A": "2"}


@pytest.mark.parametrize("bad", [{"tokens_per_minute": -1}, {"tokens_per_day": -1}, {"ceiling": 0}])
def test_policy_refuses_negative_values(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        TokenBudgetPolicy(**bad)


def test_quota_period_is_the_utc_day() -> None:
    assert quota_period(0) == (0, 86_400)
    assert quota_period(86_399.9) == (0, 86_400)
    assert quota_period(86_400) == (1, 172_800)


# -- the in-process backend --------------------------------------------------------------------------------------


class _Clocks:
    def __init__(self) -> None:
        self.now = 1000.0
        self.wall = 86_400 * 20_000 + 3600.0  # 2024-10-04, 01:00 UTC

    def monotonic(self) -> float:
        return self.now

    def unix(self) -> float:
        return self.wall


def _budgets(policy: TokenBudgetPolicy, clocks: _Clocks) -> LocalBudgets:
    return LocalBudgets(lambda client: policy, clock=clocks.monotonic, wall_clock=clocks.unix)


async def test_local_budget_refuses_with_retry_after_and_headers() -> None:
    clocks = _Clocks()
    budgets = _budgets(TokenBudgetPolicy(tokens_per_minute=600, ceiling=200), clocks)
    chat = _chat("x" * 400)  # 3 + 4 + 100 + 200 = 307 tokens
    first = await budgets.reserve("ip:a", chat)
    assert first is not None
    assert first.headers["RateLimit"] == '"tokens";r=293;t=1'
    with pytest.raises(TokenBudgetExhausted) as refused:
        await budgets.reserve("ip:a", chat)
    error = refused.value
    assert error.status == 429
    assert error.type == "token_budget_exhausted"
    assert error.retry_after == pytest.approx(1.4)  # 14 tokens short at 10 tokens per second
    assert "600 tokens per minute" in error.message
    assert error.headers["RateLimit"] == '"tokens";r=293;t=2'
    assert await budgets.reserve("ip:b", chat) is not None  # another client, another bucket
    assert budgets.stats.budget_exhausted == 1
    assert budgets.stats.reserved == 614


async def test_a_settled_refund_lets_the_next_request_in() -> None:
    clocks = _Clocks()
    budgets = _budgets(TokenBudgetPolicy(tokens_per_minute=600, ceiling=200), clocks)
    chat = _chat("x" * 400)  # 307 tokens: two do not fit in 600
    first = await budgets.reserve("ip:a", chat)
    assert first is not None
    clocks.now += 0.5
    await first.settle(Usage(100, 10, 110), relayed_chars=40)
    await first.settle(Usage(100, 10, 110), relayed_chars=40)  # once only
    assert await budgets.reserve("ip:a", chat) is not None
    assert budgets.stats.as_dict() == {
        "reservations": 2,
        "settled": 1,
        "reserved": 614,
        "charged": 110,
        "refunded": 197,
        "overrun": 0,
        "budget_exhausted": 0,
        "quota_exhausted": 0,
    }


async def test_daily_quota_names_itself_and_its_reset() -> None:
    clocks = _Clocks()
    budgets = _budgets(TokenBudgetPolicy(tokens_per_day=1000, ceiling=300), clocks)
    chat = _chat("x" * 400)  # 407 tokens
    held = [await budgets.reserve("key:k", chat) for _ in range(2)]
    with pytest.raises(TokenQuotaExhausted) as refused:
        await budgets.reserve("key:k", chat)
    error = refused.value
    assert error.type == "token_quota_exhausted"
    assert error.retry_after == 23 * 3600  # 01:00 UTC: the quota resets at midnight
    assert "daily token quota of 1000 is spent (814 used, this request may need 407)" in error.message
    assert "resets at 2024-10-05T00:00:00Z" in error.message
    assert error.headers["RateLimit"] == '"daily-tokens";r=186;t=82800'
    # A stream that used less gives the rest of its reservation back to today's quota.
    assert held[0] is not None
    await held[0].settle(None, relayed_chars=0)  # cut before its first token: charged its prompt, 107
    assert await budgets.reserve("key:k", chat) is not None
    # The next day starts from nothing, and yesterday's reservation settles into yesterday.
    clocks.wall += 23 * 3600
    assert held[1] is not None
    await held[1].settle(Usage(0, 0, 5000), relayed_chars=0)
    for _ in range(2):
        assert await budgets.reserve("key:k", chat) is not None
    assert budgets.stats.quota_exhausted == 1
    assert budgets.stats.overrun == 5000 - 407


async def test_a_request_larger_than_the_budget_is_a_400() -> None:
    budgets = _budgets(TokenBudgetPolicy(tokens_per_minute=100, tokens_per_day=10_000), _Clocks())
    with pytest.raises(RequestError, match="more than your whole budget of 100") as refused:
        await budgets.reserve("ip:a", _chat("hi", max_tokens=100))
    assert refused.value.status == 400


async def test_a_client_without_a_budget_reserves_nothing() -> None:
    budgets = _budgets(TokenBudgetPolicy(), _Clocks())
    assert await budgets.reserve("ip:a", _chat("hi")) is None


def test_per_key_values_replace_the_defaults() -> None:
    config = Config(tokens_per_minute=1000, tokens_per_day=0, token_ceiling=64)
    policy_for = policies(config, {"key:a": KeyBudget(tokens_per_day=50), "key:b": KeyBudget(tokens_per_minute=0)})
    assert policy_for("key:a") == TokenBudgetPolicy(1000, 50, 64)
    assert policy_for("key:b") == TokenBudgetPolicy(0, 0, 64)
    assert policy_for("ip:1.2.3.4") == TokenBudgetPolicy(1000, 0, 64)


# -- the keys file ------------------------------------------------------------------------------------------------


def test_keys_file_carries_per_key_budgets(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# team keys\nsk-plain\nsk-team tokens_per_minute=20000  tokens_per_day=1000000\n")
    keys = APIKeys.from_file(path)
    assert len(keys) == 2
    client = keys.identify("Bearer sk-team")
    assert keys.budgets == {client: KeyBudget(tokens_per_minute=20000, tokens_per_day=1_000_000)}
    assert keys.identify("Bearer sk-plain") not in keys.budgets


@pytest.mark.parametrize(
    "line",
    [
        "sk-secret tokens=5",
        "sk-secret tokens_per_minute=-5",
        "sk-secret tokens_per_day",
        "sk-secret tokens_per_day=1e3",
    ],
    ids=["unknown-name", "negative", "no-value", "not-whole"],
)
def test_a_bad_budget_in_the_keys_file_names_the_line_not_the_key(tmp_path: Path, line: str) -> None:
    path = tmp_path / "keys"
    path.write_text(f"sk-ok\n{line}\n")
    with pytest.raises(ConfigError, match="line 2") as refused:
        APIKeys.from_file(path)
    assert "sk-secret" not in str(refused.value)


# -- the generation settles its reservation ------------------------------------------------------------------------


async def test_a_generation_settles_what_it_relayed_once_it_ends() -> None:
    budgets = _budgets(TokenBudgetPolicy(tokens_per_minute=1000, ceiling=100), _Clocks())
    reservation = await budgets.reserve("ip:a", _chat("abcd"))  # 8 + 100
    provider = ScriptedProvider()
    generation = Generation(provider, _chat("abcd"), GenerationSettings(), budget=reservation)
    generation.start()
    provider.put([Delta("Hello, "), Reasoning("hmm"), ToolCallDelta(0, "call_1", "fn", '{"a":1}')])
    await provider.started.wait()
    provider.put(RuntimeError("the provider broke"))
    await generation.wait_closed()
    assert generation.outcome is Outcome.ERROR
    assert budgets.stats.settled == 1
    assert budgets.stats.charged == 8 + tokens_for_chars(7 + 3 + 2 + 7)


async def test_a_generation_that_never_asked_the_upstream_is_charged_nothing() -> None:
    budgets = _budgets(TokenBudgetPolicy(tokens_per_minute=1000, ceiling=100), _Clocks())
    reservation = await budgets.reserve("ip:a", _chat("abcd"))
    provider = ScriptedProvider()
    generation = Generation(provider, _chat("abcd"), GenerationSettings(), budget=reservation)
    generation.start()
    generation.cancel(Outcome.SHUTDOWN)  # before its task's first step, as when shutdown has begun
    await generation.wait_closed()
    assert provider.opened == 0
    assert budgets.stats.settled == 1
    assert budgets.stats.charged == 0
    assert budgets.stats.refunded == 108


# -- options -------------------------------------------------------------------------------------------------------


def test_budget_options_from_the_command_line_and_the_environment() -> None:
    from server.config import load_config

    config = load_config(["--tokens-per-minute", "20000", "--token-ceiling", "512"], {"LLM_RELAY_TOKENS_PER_DAY": "9"})
    assert (config.tokens_per_minute, config.tokens_per_day, config.token_ceiling) == (20000, 9, 512)
    assert (Config().tokens_per_minute, Config().tokens_per_day, Config().token_ceiling) == (0, 0, 4096)
    for bad in (["--tokens-per-minute", "-1"], ["--token-ceiling", "0"]):
        with pytest.raises(SystemExit):
            load_config(bad, {})
