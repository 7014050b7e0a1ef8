"""The benchmark's own machinery on real processes (bench/): the fake upstream's generation stamps reach the load
client through each relay, whatever its output format, and a client that leaves closes that relay's upstream
request. If these break, every relay figure of ``make bench`` is wrong, so they are checked here, small.
"""

from __future__ import annotations

import asyncio
import shutil
from typing import Any

import pytest

from bench import framings, runner, scenarios
from bench import targets as t
from bench.client import Spec, run_spec

pytestmark = pytest.mark.skipif(shutil.which("taskset") is None, reason="the bench pins processes with taskset")

RELAYS = [t.OURS, t.LEAN, t.RELAY_CEILING, t.DIRECT]
STREAMS, TOKENS = 4, 6


def _measure(target: t.Target, **fields: Any) -> dict[str, Any]:
    plan = scenarios.Plan.quick()
    runner.prepare()
    prompt = fields.pop("prompt")
    with (
        scenarios.fake_upstream(plan) as (upstream, url),
        scenarios.servers([target], "relay", plan, upstream=url, upstream_server=upstream) as running,
    ):
        spec = Spec(
            port=running[target.name].port,
            path=target.relay_path(prompt),
            leave_path=target.relay_path(prompt),
            body=target.relay_body(prompt),
            accept=target.accept,
            delimiter=target.delimiter,
            stamps=True,
            upstream_port=upstream.port,
            **fields,
        )
        return asyncio.run(run_spec(spec))


@pytest.mark.parametrize("target", RELAYS, ids=[r.kind for r in RELAYS])
def test_every_token_arrives_with_its_generation_stamp(target: t.Target) -> None:
    result = _measure(
        target,
        prompt=f"n={TOKENS} d=0.02 f=0 s=1",
        mode="paced",
        connections=STREAMS,
        tokens=TOKENS,
        delay=0.02,
        ramp=0.0,
        one_wave=True,
        duration=TOKENS * 0.02,
        deadline=30.0,
    )
    assert (result["measured_streams"], result["short_streams"], result["bad_status"]) == (STREAMS, 0, 0)
    assert result["relay_lag_samples"] == STREAMS * TOKENS
    # Each stream's first token, its middle ones and its last, told apart (the report's lag by place).
    assert result["relay_lag_samples_by_place"] == [STREAMS, STREAMS * (TOKENS - 2), STREAMS]
    # Receipt minus stamp on one clock: never negative.
    assert result["relay_lag_percentiles"][0][1] >= 0


@pytest.mark.parametrize("target", [t.OURS, t.LEAN, t.RELAY_CEILING], ids=["ours", "lean", "relay-ceiling"])
def test_a_client_that_leaves_closes_the_relays_upstream_request(target: t.Target) -> None:
    result = _measure(
        target,
        prompt="n=200 d=0.02 f=0 s=1 id=track{i}",
        mode="leave",
        connections=0,  # leavers only: a background stream would share track0 with the first leaver
        leavers=STREAMS,
        leave_after_frames=(2, 3),
        leave_spread=0.0,
        tokens=200,
        ramp=0.0,
        duration=600.0,
        close_wait=10.0,
        deadline=30.0,
    )
    assert (result["left"], result["closed"], result["ran_to_end"]) == (STREAMS, STREAMS, 0), result


@pytest.mark.parametrize("framing", framings.FRAMINGS)
def test_every_output_framing_carries_the_stamps(framing: str) -> None:
    """bench.framings counts tokens by their stamps in every framing, the POST ones (/v1, /api/ui-chat) included."""
    plan = scenarios.Plan.quick()
    runner.prepare()
    path, body, accept = framings.request(framing, f"n={TOKENS} d=0.02 f=0 s=1")
    with (
        scenarios.fake_upstream(plan) as (_, url),
        scenarios.servers([t.OURS], "relay", plan, upstream=url) as running,
    ):
        spec = Spec(
            port=running[t.OURS.name].port,
            path=path,
            body=body,
            accept=accept,
            mode="paced",
            stamps=True,
            one_wave=True,
            connections=STREAMS,
            tokens=TOKENS,
            delay=0.02,
            ramp=0.0,
            duration=TOKENS * 0.02,
            deadline=30.0,
        )
        result = asyncio.run(run_spec(spec))
    assert (result["measured_streams"], result["short_streams"], result["bad_status"]) == (STREAMS, 0, 0), result
    assert result["relay_lag_samples"] == STREAMS * TOKENS
