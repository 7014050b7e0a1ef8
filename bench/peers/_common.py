"""What the peers share: settings from the runner's environment. None of it is on a request's hot path."""

from __future__ import annotations

import asyncio
import os

from bench import payload, probe

HEARTBEAT = float(os.environ.get("BENCH_HEARTBEAT", "2"))
UPSTREAM = os.environ.get("BENCH_UPSTREAM", "http://127.0.0.1:9001/v1")
MODEL = "fake-model"
UVLOOP = os.environ.get("BENCH_UVLOOP", "1") == "1"
# Every server gets the same listen backlog (our server's default), so no figure is about a default's queue:
# the reconnect storm compares backlogs on its own.
BACKLOG = 4096


def tokens() -> list[str]:
    return payload.tokens()


def use_uvloop() -> None:
    """The same event loop for every asyncio server, so the comparison is about the approach, not the loop."""
    if UVLOOP:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def port_from_argv(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    return int(parser.parse_args(argv).port)


probe.install()
