"""The bench's plan, without processes: what a quick run leaves out of `make bench` (and says so), how a left-out
peer comes back, warm-up waves run one at a time or together, and the idle heartbeat reaching every server."""

from __future__ import annotations

import dataclasses
import itertools
import re
import threading
import time

import pytest

from bench import runner, scenarios
from bench import targets as t
from bench.__main__ import DEFAULT_SCENARIOS


def _relay_names(plan: scenarios.Plan) -> set[str]:
    return {target.name for target in plan.selected(t.RELAYS)}


def test_the_full_plan_leaves_nothing_out() -> None:
    plan = scenarios.Plan()
    assert scenarios.left_out(plan, DEFAULT_SCENARIOS) == []
    assert {t.LITELLM.name, *(p.name for p in t.PEERS)} <= _relay_names(plan)


def test_quick_leaves_out_litellm_the_tutorials_and_the_what_if_and_says_so() -> None:
    plan = scenarios.Plan.quick()
    notes = scenarios.left_out(plan, DEFAULT_SCENARIOS)
    assert [note.split(" ")[:2] for note in notes] == [
        ["LiteLLM", "proxy:"],
        ["the", "tutorial"],
        ["the", "what-if"],
    ]
    assert t.LITELLM.name not in _relay_names(plan)


def test_the_command_the_litellm_note_gives_brings_it_back_beside_the_floors() -> None:
    quick = scenarios.Plan.quick()
    (note,) = [n for n in scenarios.left_out(quick, ["relay"]) if n.startswith(t.LITELLM.name)]
    command = re.search(r"`python -m bench --quick --scenarios relay --targets ([\w,-]+)`", note)
    assert command is not None, note
    plan = dataclasses.replace(quick, targets=tuple(command[1].split(",")))
    assert _relay_names(plan) == {t.OURS.name, t.LEAN.name, t.RELAY_CEILING.name, t.DIRECT.name, t.LITELLM.name}
    assert not any(n.startswith(t.LITELLM.name) for n in scenarios.left_out(plan, ["relay"]))


@pytest.mark.parametrize(
    ("chosen", "left"),
    [(["storm", "resume"], 0), (["idle"], 1), (["relay"], 3)],
    ids=["no-peers", "idle-tutorials-only", "relay-all-three"],
)
def test_only_what_the_chosen_scenarios_would_run_is_said_to_be_left_out(chosen: list[str], left: int) -> None:
    assert len(scenarios.left_out(scenarios.Plan.quick(), chosen)) == left


def test_warm_up_waves_together_run_at_the_same_time() -> None:
    plan = scenarios.Plan.quick()
    assert plan.warm_up_together
    # Each wave waits for every other at the barrier: they pass only if all run at once (one at a time, the first
    # would break the barrier at its timeout and fail the warm-up).
    barrier = threading.Barrier(3, timeout=30)
    scenarios.warm_up(plan, [barrier.wait] * 3, 0.0)


def test_warm_up_waves_one_at_a_time_never_overlap() -> None:
    plan = scenarios.Plan()
    assert not plan.warm_up_together
    spans: list[tuple[float, float]] = []

    def wave() -> None:
        began = time.monotonic()
        time.sleep(0.01)
        spans.append((began, time.monotonic()))

    scenarios.warm_up(plan, [wave] * 3, 0.0)
    assert len(spans) == 3
    assert all(end <= next_began for (_, end), (next_began, _) in itertools.pairwise(spans))


@pytest.mark.parametrize("together", [True, False], ids=["together", "one-at-a-time"])
def test_a_failed_warm_up_wave_fails_the_run(together: bool) -> None:
    plan = dataclasses.replace(scenarios.Plan(), warm_up_together=together)

    def broken() -> None:
        raise RuntimeError("load client failed")

    with pytest.raises(RuntimeError, match="load client failed"):
        scenarios.warm_up(plan, [broken], 0.0)


@pytest.mark.parametrize("plan", [scenarios.Plan(), scenarios.Plan.quick()], ids=["full", "quick"])
def test_the_idle_heartbeat_reaches_ours_and_the_peers(plan: scenarios.Plan) -> None:
    heartbeat = f"{plan.idle_heartbeat:g}"
    ours = t.OURS.command(1, "idle", upstream="", uvloop=True, threads=1, heartbeat=plan.idle_heartbeat)
    assert ours[ours.index("--heartbeat") + 1] == heartbeat
    assert runner.environment("", True, heartbeat=plan.idle_heartbeat)["BENCH_HEARTBEAT"] == heartbeat
