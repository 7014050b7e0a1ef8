"""A provider the test drives step by step, and the relay mounted in a host app around it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any

from aiohttp import web

from server.app import create_relay_app, setup_openai_compatible
from server.chat_request import ChatRequest
from server.config import Config
from server.events import Event

BASE = Config(provider="demo", limits_enabled=False, heartbeat=0.0)
# What the scripted provider is told to do next: yield a batch, raise, or (None) end without a terminal event.
Step = Sequence[Event] | BaseException | None


class ScriptedProvider:
    """Yields exactly the batches the test puts in its queue, raises the exceptions put there; `None` ends the
    generator. Counts streams opened and closed (the generator's ``finally``)."""

    name = "scripted"

    def __init__(self) -> None:
        self.steps: asyncio.Queue[Step] = asyncio.Queue()
        self.started = asyncio.Event()
        self.closed = asyncio.Event()
        self.opened = 0
        self.finished = 0

    async def stream(self, request: ChatRequest) -> AsyncGenerator[Sequence[Event], None]:
        self.opened += 1
        self.closed.clear()
        self.started.set()
        try:
            while (step := await self.steps.get()) is not None:
                if isinstance(step, BaseException):
                    raise step
                yield step
        finally:
            self.finished += 1
            self.closed.set()

    def put(self, *steps: Step) -> None:
        for step in steps:
            self.steps.put_nowait(step)

    async def aclose(self) -> None:
        return None


def relay_host(
    config: Config, provider: object, *, middlewares: Sequence[Any] = (), openai_prefix: str | None = None
) -> tuple[web.Application, web.Application]:
    """The relay mounted under /api of a host app (as an embedding service does), and its OpenAI-compatible routes
    under `openai_prefix` if given; returns (host, api)."""
    host = web.Application(middlewares=list(middlewares))
    api = create_relay_app(config, provider=provider)  # type: ignore[arg-type]
    host.add_subapp("/api", api)
    if openai_prefix is not None:
        setup_openai_compatible(host, api, prefix=openai_prefix)
    return host, api


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)
